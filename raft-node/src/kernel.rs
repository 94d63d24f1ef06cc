//! Keeping this node's kernel maps in the committed order: capture (scan backend) and apply.
//!
//! For each watched map the node keeps a *shadow*: the contents it believes the kernel map has,
//! either because it applied them or because it captured them. The two directions:
//!
//! - **capture**: a periodic scan diffs the kernel map against the shadow; every difference is a
//!   local change. It is recorded in the shadow and as *pending* (on its way through the log),
//!   then proposed through group commit. A proposal that does not commit (no leader, a lost
//!   answer) keeps its mark, and the next scan proposes the kernel's value again.
//! - **apply** ([`ApplyHook`]): a committed change made elsewhere is written to the kernel map and
//!   the shadow, unless the key has a pending local change (a newer local value must not be
//!   overwritten by an older committed one; the local change commits after it). A committed
//!   change that this node proposed is never written back (the kernel already had it): it only
//!   clears the key's pending mark.
//!
//! Because the applier records its writes in the shadow before making them, the scan never
//! mistakes them for local changes (no echo). Keys the applier writes while a scan is reading
//! the map are left out of that scan's diff and looked at again by the next one.
//!
//! On start, and whenever a map is recreated (its kernel id changes), the map is reconciled:
//! the id last seen is persisted in the data dir; if it is the same map, entries that differ from
//! the committed state are local changes made while the daemon was down and are proposed; if the
//! map is new, it is filled from the committed state by diff (never cleared first).

use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use raftmap_ebpf_hooks::{
    diff, shadow_from, Backend, Capture, CaptureEvent, EchoFilter, KernelChange, KernelMap,
    MapKind, Shadow, ShadowKey, UpdateFlags, MAX_EVENT_KEY, MAX_EVENT_VALUE,
};
use raftmap_storage::{
    batch_runs, ApplyHook, BatchOutcome, Change, MapContents, MapSchema, MapType, NodeId, Op,
    Source, StateView,
};
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};

use crate::error::{NodeError, Result};
use crate::propose::{Batcher, Ticket};

/// A watched map: its cluster-wide name and where the kernel map is on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Name of the replicated map.
    pub map: String,
    /// bpffs path of the kernel map.
    pub pin: Option<PathBuf>,
    /// Or: the kernel map's name (must be unique among loaded maps).
    pub kernel_name: Option<String>,
}

impl std::str::FromStr for WatchSpec {
    type Err = String;
    /// `NAME=/sys/fs/bpf/PATH` (pinned) or `NAME=KERNEL_MAP_NAME`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (map, target) = s.split_once('=').ok_or_else(|| {
            format!("--watch {s:?}: expected NAME=/bpffs/path or NAME=kernel_map_name")
        })?;
        raftmap_storage::validate_map_name(map).map_err(|e| format!("--watch {s:?}: {e}"))?;
        let (pin, kernel_name) = if target.starts_with('/') {
            (Some(PathBuf::from(target)), None)
        } else if !target.is_empty() {
            (None, Some(target.to_string()))
        } else {
            return Err(format!("--watch {s:?}: empty map location"));
        };
        Ok(WatchSpec {
            map: map.to_string(),
            pin,
            kernel_name,
        })
    }
}

impl WatchSpec {
    fn open(&self) -> std::result::Result<KernelMap, raftmap_ebpf_hooks::HookError> {
        match (&self.pin, &self.kernel_name) {
            (Some(p), _) => KernelMap::open_pinned(p),
            (None, Some(n)) => KernelMap::open_by_name(n),
            (None, None) => Err(raftmap_ebpf_hooks::HookError::NotFound(self.map.clone())),
        }
    }

    fn location(&self) -> String {
        match (&self.pin, &self.kernel_name) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(n)) => format!("kernel map {n:?}"),
            (None, None) => "nowhere".into(),
        }
    }
}

/// An error and every error under it, as one line (`opening map X: BPF_OBJ_GET failed: No
/// such file or directory`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// The replicated schema a kernel map implies.
fn schema_of(name: &str, map: &KernelMap) -> MapSchema {
    let l = map.layout();
    MapSchema {
        name: name.to_string(),
        map_type: match l.kind {
            MapKind::Hash => MapType::Hash,
            MapKind::LruHash => MapType::LruHash,
            MapKind::Array => MapType::Array,
        },
        key_size: l.key_size,
        value_size: l.value_size,
        max_entries: l.max_entries,
    }
}

/// `kernel-maps.json`: the kernel id of each watched map, and the boot it was seen in.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
pub(crate) struct RecordedIds {
    boot_id: String,
    ids: BTreeMap<String, u32>,
}

/// The contents of `kernel-maps.json`, if they are well formed.
pub(crate) fn parse_recorded_ids(bytes: &[u8]) -> Option<RecordedIds> {
    serde_json::from_slice(bytes).ok()
}

/// This boot's id (a map id from another boot says nothing about the map now).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A key and its new value (`None`: deleted), borrowed from the committed entry.
type KeyChange<'a> = (&'a [u8], Option<&'a [u8]>);

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

/// A local change on its way through the log.
#[derive(Debug, Clone)]
struct Mark {
    value: Option<Vec<u8>>,
    /// Which capture of the key this is; only the latest one settles the key (when the
    /// applier reaches the index it committed at, see `MapState::commits`).
    gen: u64,
}

/// A committed change that arrived while its map was being reconciled.
#[derive(Debug)]
enum Missed {
    Change {
        index: u64,
        captured_here: bool,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    Snapshot {
        index: u64,
        contents: HashMap<Vec<u8>, Vec<u8>>,
    },
}

/// Kernel entries compared per hold of a map's lock during a scan.
const SCAN_SLICE: usize = 512;

/// After a scan round that took `t`, the next one starts no sooner than `t` times this: scans
/// of large maps take at most a tenth of the time.
const SCAN_PAUSE_FACTOR: u32 = 9;

/// How long after a proposal of captured changes failed to commit a scan proposes them again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Most key and value bytes held for a map that is not reconciled yet; past that they are
/// dropped and the map, once found, is filled from the committed state.
const HELD_BYTES_CAP: usize = 256 << 20;

#[derive(Debug, Default)]
struct MapState {
    kmap: Option<Arc<KernelMap>>,
    /// Set while the map is being reconciled; committed changes are collected in `missed`
    /// meanwhile and applied once the reconciled state is in place.
    reconciling: bool,
    missed: Vec<Missed>,
    /// `missed` overflowed: the order of changes is lost.
    missed_overflow: bool,
    /// Key and value bytes held in `missed` and `logged`.
    held_bytes: usize,
    /// Every value the log gave each key while the map waited for reconciliation (snapshots
    /// included): a kernel value among them is not a change made while the daemon was down.
    logged: HashMap<Vec<u8>, Vec<Option<Vec<u8>>>>,
    /// The committed contents when the daemon started, before any entry was applied: what the
    /// kernel map held when the daemon last ran (the base of the three-way merge on restart).
    base: Option<HashMap<Vec<u8>, Vec<u8>>>,
    shadow: Shadow,
    /// Local changes on their way through the log.
    pending: HashMap<Vec<u8>, Mark>,
    /// For keys with a pending mark: the latest committed value the applier saw (and did not
    /// write, so as not to overwrite the newer local value). Settling the key writes it if the
    /// log ended somewhere else than the local value.
    committed_while_pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Captures known committed, by commit index: `(key, capture generation)`. Settling takes
    /// the due ones from the front instead of walking every pending mark.
    commits: BTreeMap<u64, Vec<(Vec<u8>, u64)>>,
    /// Pending keys whose proposal did not commit (or is not known to have): the next scan
    /// proposes the kernel's value again. The mark stays meanwhile, so that committed values
    /// this node has yet to apply (it may lag behind the log) do not go over the local one.
    retry: HashSet<Vec<u8>>,
    /// Keys in `retry` whose last proposal went in a batch the cluster refused: each is
    /// proposed in a batch of its own next, so that one refused change (a full map) is undone
    /// alone and never takes the others of its batch with it.
    alone: HashSet<Vec<u8>>,
    /// Local changes the cluster refused and that were undone here, and the last reason.
    refusals: u64,
    last_refusal: Option<String>,
    scanning: bool,
    touched: HashSet<Vec<u8>>,
    /// Scans done, for the occasional full look for deleted entries.
    scans: u64,
    refused: Option<String>,
    /// Why the map could not be opened the last time it was looked for.
    open_error: Option<String>,
    /// Entries the kernel map held at the last scan or reconcile.
    entries: u64,
    /// Keys the applier wrote in the last `RECENT_APPLY` to twice that (two generations).
    recently_applied: [HashSet<Vec<u8>>; 2],
    recent_since: Option<Instant>,
}

/// How long a key the applier wrote counts as recently written: longer than a capture takes to
/// reach the daemon (the ring buffer is read within milliseconds).
const RECENT_APPLY: Duration = Duration::from_millis(100);

impl MapState {
    /// Notes that the applier wrote `key` just now.
    fn note_applied(&mut self, key: &[u8]) {
        let now = Instant::now();
        match self.recent_since {
            Some(t) if now.duration_since(t) < RECENT_APPLY => {}
            _ => {
                let [newer, older] = &mut self.recently_applied;
                std::mem::swap(newer, older);
                newer.clear();
                self.recent_since = Some(now);
            }
        }
        self.recently_applied[0].insert(key.to_vec());
    }

    /// Whether the applier wrote `key` within the last `RECENT_APPLY` or so.
    fn applied_recently(&self, key: &[u8]) -> bool {
        self.recent_since
            .is_some_and(|t| t.elapsed() < 2 * RECENT_APPLY)
            && self.recently_applied.iter().any(|s| s.contains(key))
    }

    /// Holds committed changes for a map being reconciled, and logs their values.
    fn hold(&mut self, items: impl IntoIterator<Item = Missed>) {
        if self.missed_overflow {
            return;
        }
        for m in items {
            match &m {
                Missed::Change { key, value, .. } => {
                    self.held_bytes += 2 * (key.len() + value.as_ref().map_or(0, Vec::len));
                    self.logged
                        .entry(key.clone())
                        .or_default()
                        .push(value.clone());
                }
                Missed::Snapshot { contents, .. } => {
                    let absent: Vec<Vec<u8>> = self
                        .base
                        .iter()
                        .flat_map(|b| b.keys())
                        .filter(|k| !contents.contains_key(*k))
                        .cloned()
                        .collect();
                    for k in absent {
                        self.logged.entry(k).or_default().push(None);
                    }
                    for (k, v) in contents {
                        self.held_bytes += 2 * (k.len() + v.len());
                        self.logged
                            .entry(k.clone())
                            .or_default()
                            .push(Some(v.clone()));
                    }
                }
            }
            self.missed.push(m);
            if self.held_bytes > HELD_BYTES_CAP {
                self.missed.clear();
                self.logged.clear();
                self.held_bytes = 0;
                self.missed_overflow = true;
                return;
            }
        }
    }
}

#[derive(Debug)]
struct Watched {
    spec: WatchSpec,
    state: Mutex<MapState>,
}

fn lock(m: &Mutex<MapState>) -> MutexGuard<'_, MapState> {
    // A panic while holding the lock leaves a state that the next reconciliation repairs.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-map kernel metrics.
#[derive(Debug, Default)]
pub struct KernelMetrics {
    pub captured: Family<Vec<(String, String)>, Counter>,
    pub applied: Family<Vec<(String, String)>, Counter>,
    pub deferred: Family<Vec<(String, String)>, Counter>,
    pub apply_errors: Family<Vec<(String, String)>, Counter>,
    pub scan_repairs: Family<Vec<(String, String)>, Counter>,
    pub uncommitted: Family<Vec<(String, String)>, Counter>,
    /// Local changes the cluster refused (schema, a full map), undone in the kernel map.
    pub refused: Family<Vec<(String, String)>, Counter>,
    /// Local writes the applier overwrote before they were captured, written back.
    pub restored: Family<Vec<(String, String)>, Counter>,
    pub entries: Family<Vec<(String, String)>, Gauge>,
    pub ring_drops: Family<Vec<(String, String)>, Counter>,
    pub echoes: Family<Vec<(String, String)>, Counter>,
    /// 1 for the capture backend in use.
    pub backend: Family<Vec<(String, String)>, Gauge>,
}

fn label(map: &str) -> Vec<(String, String)> {
    vec![
        ("map".into(), map.into()),
        ("backend".into(), "scan".into()),
    ]
}

/// The kernel side of one node.
#[derive(Debug)]
pub struct KernelSync {
    me: NodeId,
    maps: BTreeMap<String, Watched>,
    ids_path: PathBuf,
    /// The event-driven backend in use (the scan always runs too).
    backend: Mutex<Backend>,
    /// Commands to the event loop, which owns the capture programs.
    capture_cmds: OnceLock<mpsc::UnboundedSender<CaptureCmd>>,
    /// Kernel map id -> watched map name, for routing events.
    ids: Mutex<HashMap<u32, String>>,
    /// Wakes the scan loop early (events were lost, or could not be decoded).
    scan_now: Notify,
    /// The applier's own writes, to recognise them among fexit events (which report every
    /// writer; the syscall backend leaves raftmap's process out in the kernel).
    echoes: Mutex<EchoFilter>,
    /// Capture generation counter (see `Mark::gen`).
    gen: AtomicU64,
    /// Highest log index the apply hook has seen.
    hooked_index: AtomicU64,
    pub metrics: Arc<KernelMetrics>,
}

#[derive(Debug)]
enum CaptureCmd {
    Watch(u32),
    Unwatch(u32),
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
            ids_path: data_dir.join("kernel-maps.json"),
            backend: Mutex::new(Backend::Scan),
            capture_cmds: OnceLock::new(),
            ids: Mutex::new(HashMap::new()),
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

    /// Each watched map's state.
    pub fn states(&self) -> Vec<WatchedState> {
        let backend = self.backend();
        self.maps
            .iter()
            .map(|(name, w)| {
                let st = lock(&w.state);
                // Keys and values too large for the event records are left to the scan.
                let fits = st.kmap.as_ref().is_none_or(|m| {
                    m.layout().key_size <= MAX_EVENT_KEY && m.layout().value_size <= MAX_EVENT_VALUE
                });
                let b = if fits { backend } else { Backend::Scan };
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
                    backend: b,
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

    /// Map ids recorded in this boot. Kernel map ids restart after a reboot, so an id is only
    /// meaningful together with the boot it was seen in.
    fn load_ids(&self) -> BTreeMap<String, u32> {
        // Unreadable (missing, corrupt): no map is known, each is adopted as on first sight.
        let recorded = std::fs::read(&self.ids_path)
            .ok()
            .and_then(|b| parse_recorded_ids(&b));
        let boot = boot_id();
        match recorded {
            // Without a boot id nothing tells an id of this boot from a recycled one.
            Some(r) if !boot.is_empty() && r.boot_id == boot => r.ids,
            _ => BTreeMap::new(),
        }
    }

    fn save_id(&self, map: &str, id: u32) {
        let mut ids = self.load_ids();
        ids.insert(map.to_string(), id);
        let recorded = RecordedIds {
            boot_id: boot_id(),
            ids,
        };
        let res = serde_json::to_vec(&recorded)
            .map_err(|e| NodeError::Internal(e.to_string()))
            .and_then(|b| crate::identity::write_atomic(&self.ids_path, &b));
        if let Err(e) = res {
            tracing::warn!(error = %e, path = %self.ids_path.display(), "cannot record kernel map ids");
        }
    }

    /// The capture backend in use for maps whose keys and values fit its events.
    pub fn backend(&self) -> Backend {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts capturing: the best event-driven backend that loads, and the scan loop, which
    /// reconciles each map and then scans it every `interval` (at once when events were lost).
    pub fn start(self: &Arc<Self>, view: StateView, batcher: Batcher, interval: Duration) {
        if self.maps.is_empty() {
            return;
        }
        match Capture::best() {
            Ok(capture) => {
                match capture.backend() {
                    Backend::Fexit => tracing::info!(
                        backend = "fexit",
                        "capturing every change to watched maps as it happens (fexit on the kernel's hash map operations)"
                    ),
                    b => tracing::info!(
                        backend = %b,
                        "fexit is not available; capturing bpf(2) syscalls as they happen, and BPF programs' own writes by scanning every {interval:?}"
                    ),
                }
                self.set_backend(capture.backend());
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = self.capture_cmds.set(tx);
                tokio::spawn(
                    self.clone()
                        .event_loop(capture, rx, view.clone(), batcher.clone()),
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "no event-driven capture backend loads here; capturing by scanning every {interval:?}"
            ),
        }
        if self.backend() == Backend::Scan {
            self.set_backend(Backend::Scan);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round: u64 = 0;
            let mut all_ready = false;
            loop {
                // A map that is not reconciled yet (missing, or its first attempt failed: no
                // leader yet, say) is tried again soon, whatever the scan interval.
                let soon = tokio::time::sleep(if all_ready {
                    interval
                } else {
                    RETRY_AFTER.min(interval)
                });
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = soon => {}
                    _ = this.scan_now.notified() => {}
                }
                let started = Instant::now();
                for (name, w) in &this.maps {
                    if let Err(e) = this.step(name, w, &view, &batcher, round).await {
                        tracing::warn!(map = %name, error = %e, "kernel map sync");
                    }
                }
                let all = this.maps.values().all(|w| {
                    let st = lock(&w.state);
                    st.kmap.is_some() || st.refused.is_some()
                });
                all_ready = all;
                round += 1;
                // A scan reads the whole map: on large maps it must not take the node's CPU
                // (at most a tenth of the time, whatever the interval or the loss signals ask).
                tokio::time::sleep(started.elapsed() * SCAN_PAUSE_FACTOR).await;
            }
        });
    }

    fn set_backend(&self, b: Backend) {
        let mut cur = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        self.metrics
            .backend
            .get_or_create(&vec![("backend".into(), cur.to_string())])
            .set(0);
        *cur = b;
        self.metrics
            .backend
            .get_or_create(&vec![("backend".into(), b.to_string())])
            .set(1);
    }

    /// Whether the capture backend reports raftmap's own writes to this map, so that they must
    /// be registered as expected echoes: fexit does, for maps whose keys and values fit events.
    fn reports_own_writes(&self, map: &KernelMap) -> bool {
        let l = map.layout();
        self.backend() == Backend::Fexit
            && l.key_size <= MAX_EVENT_KEY
            && l.value_size <= MAX_EVENT_VALUE
    }

    /// Writes a committed value into a kernel map (`None`: delete), first registering the write
    /// as an expected echo when the capture backend reports the applier's own writes.
    fn write_kernel(
        &self,
        map: &KernelMap,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> raftmap_ebpf_hooks::Result<()> {
        let register = self.reports_own_writes(map);
        let id = map.layout().id;
        if register {
            self.echoes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .register(id, key, value);
        }
        let res = match value {
            Some(v) => map.update(key, v, UpdateFlags::Any).map(|()| true),
            None => map.delete(key),
        };
        // No event follows a failed write, nor a delete of an absent key.
        if register && !matches!(res, Ok(true)) {
            self.echoes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unregister(id, key, value);
        }
        res.map(drop)
    }

    /// After a failed write the shadow must hold what the kernel really has, or the next scan
    /// would propose the difference (a delete of a committed key) to the whole cluster.
    fn resync_key(st: &mut MapState, kmap: &KernelMap, key: &[u8]) {
        match kmap.lookup(key) {
            Ok(v) => apply_to(&mut st.shadow, key, v.as_deref()),
            Err(e) => tracing::warn!(error = %e, "reading back a key after a failed write"),
        }
    }

    /// Routes a (re)opened map's events to it.
    fn track(&self, name: &str, old: Option<u32>, new: u32) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = old {
            ids.remove(&o);
        }
        ids.insert(new, name.to_string());
        if let Some(tx) = self.capture_cmds.get() {
            if let Some(o) = old {
                let _ = tx.send(CaptureCmd::Unwatch(o));
            }
            let _ = tx.send(CaptureCmd::Watch(new));
        }
    }

    async fn event_loop(
        self: Arc<Self>,
        mut capture: Capture,
        mut cmds: mpsc::UnboundedReceiver<CaptureCmd>,
        view: StateView,
        batcher: Batcher,
    ) {
        let mut drops = (0, 0);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        let mut events = Vec::new();
        let mut held = Vec::new();
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let res = match cmd {
                        Some(CaptureCmd::Watch(id)) => capture.watch(id),
                        Some(CaptureCmd::Unwatch(id)) => capture.unwatch(id),
                        None => return,
                    };
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "updating the captured map set");
                    }
                }
                res = capture.next_events(&mut events) => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "reading capture events; falling back to the scan");
                        self.set_backend(Backend::Scan);
                        return;
                    }
                    self.on_events(std::mem::take(&mut events), &mut held, &view, &batcher).await;
                }
                _ = check.tick() => {
                    match capture.drops() {
                        Ok(d) if d != drops => {
                            self.metrics.ring_drops.get_or_create(&vec![("backend".to_string(), capture.backend().to_string())]).inc_by((d.0 - drops.0) + (d.1 - drops.1));
                            drops = d;
                            // Echoes whose events were lost would otherwise wait forever (and
                            // could swallow a real write); the scan repairs whatever follows.
                            self.echoes.lock().unwrap_or_else(|p| p.into_inner()).clear();
                            tracing::debug!(lost = d.0, undecoded = d.1, "capture missed changes; scanning now");
                            self.scan_now.notify_one();
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "reading the capture drop counters"),
                    }
                }
            }
        }
    }

    /// Captured changes: record them in the shadow as pending and propose them. `held` carries
    /// LRU evictions over to the next call while their cause is not known yet.
    async fn on_events(
        self: &Arc<Self>,
        events: Vec<CaptureEvent>,
        held: &mut Vec<CaptureEvent>,
        view: &StateView,
        batcher: &Batcher,
    ) {
        let mut by_map: BTreeMap<String, Vec<raftmap_ebpf_hooks::KernelChange>> = BTreeMap::new();
        let mut applier_evicted: Vec<(String, Vec<u8>)> = Vec::new();
        {
            let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            let mut echoes = self.echoes.lock().unwrap_or_else(|p| p.into_inner());
            let sorted = attribute_evictions(events, held, &mut echoes);
            if sorted.echoes > 0 {
                self.metrics
                    .echoes
                    .get_or_create(&vec![("backend".into(), "fexit".into())])
                    .inc_by(sorted.echoes);
            }
            applier_evicted.extend(
                sorted
                    .applier_evicted
                    .into_iter()
                    .filter_map(|h| Some((ids.get(&h.map_id)?.clone(), h.key))),
            );
            let accepted = sorted.accepted;
            for ev in accepted {
                if let Some(name) = ids.get(&ev.map_id) {
                    by_map.entry(name.clone()).or_default().push(
                        raftmap_ebpf_hooks::KernelChange {
                            key: ev.key,
                            value: ev.value,
                        },
                    );
                }
            }
        }
        // The keys evictions caused by the applier removed left this node's map only: they
        // leave the shadow without being proposed, so the scan does not propose them either.
        // (Taken after releasing the id and echo locks: the apply path takes a map's state
        // lock before the echo lock.)
        for (name, key) in applier_evicted {
            if let Some(w) = self.maps.get(&name) {
                lock(&w.state).shadow.remove(key.as_slice());
            }
        }
        for (name, changes) in by_map {
            let Some(w) = self.maps.get(&name) else {
                continue;
            };
            let fresh: Vec<_> = {
                let mut st = lock(&w.state);
                if st.kmap.is_none() || st.refused.is_some() {
                    continue;
                }
                // Repeated writes to a key within this batch of events: only the last counts.
                let mut last: HashMap<Vec<u8>, Option<Vec<u8>>> =
                    HashMap::with_capacity(changes.len());
                let mut order = Vec::with_capacity(changes.len());
                for c in changes {
                    if last.insert(c.key.clone(), c.value).is_none() {
                        order.push(c.key);
                    }
                }
                let changes = order.into_iter().filter_map(|key| {
                    let value = last.remove(&key)?;
                    Some(raftmap_ebpf_hooks::KernelChange { key, value })
                });
                // Already known (the shadow has it): nothing to propose.
                let fresh: Vec<_> = changes
                    .filter(|c| {
                        st.shadow.get(c.key.as_slice()).map(Vec::as_slice) != c.value.as_deref()
                    })
                    .collect();
                let overwritten = self.overwritten_captures(&st, &fresh);
                let fresh = self.mark_captured(&mut st, fresh);
                self.restore(&mut st, &name, overwritten);
                fresh
            };
            self.propose_detached(&name, view, batcher, fresh).await;
        }
    }

    async fn step(
        self: &Arc<Self>,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
        round: u64,
    ) -> Result<()> {
        if lock(&w.state).refused.is_some() {
            return Ok(());
        }
        // (Re)open: at start, when the map was missing, and every 10 rounds to notice a map
        // that was recreated under the same pin or name.
        let need_open = lock(&w.state).kmap.is_none() || round % 10 == 0;
        if need_open {
            let opened = match w.spec.open() {
                Ok(m) => {
                    lock(&w.state).open_error = None;
                    m
                }
                Err(e) => {
                    lock(&w.state).open_error = Some(error_chain(&e));
                    // Keep the map open (our descriptor keeps it alive) until its successor
                    // appears under the same pin or name.
                    if round % 50 == 0 {
                        tracing::warn!(map = %name, location = %w.spec.location(), error = %e, "kernel map not found");
                    }
                    if lock(&w.state).kmap.is_none() {
                        return Ok(());
                    }
                    return self.scan(name, w, view, batcher).await;
                }
            };
            let known = lock(&w.state).kmap.as_ref().map(|m| m.layout().id);
            if known != Some(opened.layout().id) {
                self.reconcile(name, w, opened, view, batcher).await?;
            }
        }
        self.scan(name, w, view, batcher).await
    }

    /// First sight of a kernel map (start, or recreated): check the schema, then merge.
    async fn reconcile(
        &self,
        name: &str,
        w: &Watched,
        kmap: KernelMap,
        view: &StateView,
        batcher: &Batcher,
    ) -> Result<()> {
        let wanted = schema_of(name, &kmap);
        let mut declared = view.schema(name);
        if declared.is_none() {
            // Declaring an identical schema is idempotent; a conflicting one is refused and the
            // cluster's schema is reported below.
            tracing::info!(map = %name, schema = %wanted, "declaring the map from the kernel map's layout");
            let out = batcher
                .submit(vec![Op::DeclareMap(wanted.clone())], Source::Kernel)
                .await?;
            view.wait_applied(out.index, Duration::from_secs(10)).await;
            declared = view.schema(name);
        }
        match declared {
            None => {
                return Err(NodeError::Unavailable(format!(
                    "map {name} is not declared in the cluster yet"
                )))
            }
            Some(s) if s != wanted => {
                let reason = format!(
                    "kernel map {} is {wanted} but the cluster declares {s}; not syncing it",
                    w.spec.location()
                );
                tracing::error!(map = %name, "{reason}");
                let mut st = lock(&w.state);
                st.refused = Some(reason);
                st.reconciling = false;
                st.missed.clear();
                st.logged.clear();
                st.held_bytes = 0;
                st.base = None;
                return Ok(());
            }
            Some(_) => {}
        }
        let id = kmap.layout().id;
        let l = kmap.layout();
        if self.backend() != Backend::Scan
            && (l.key_size > MAX_EVENT_KEY || l.value_size > MAX_EVENT_VALUE)
        {
            tracing::warn!(
                map = %name,
                key_size = l.key_size,
                value_size = l.value_size,
                "keys over {MAX_EVENT_KEY} B or values over {MAX_EVENT_VALUE} B do not fit capture events; this map's changes are captured by the scan only"
            );
        }
        let recorded = self.load_ids().get(name).copied();
        let old_id = lock(&w.state).kmap.as_ref().map(|m| m.layout().id);
        let kmap = Arc::new(kmap);
        // From here on the apply hook collects this map's committed changes in `missed`. Those
        // it saw before are persisted once the state machine reaches the index it had seen,
        // so the read below includes them. (At start-up the map has been collecting since the
        // store opened; a failed attempt leaves it collecting.)
        let (was_reconciling, overflowed) = {
            let mut st = lock(&w.state);
            let was = std::mem::replace(&mut st.reconciling, true);
            let overflowed = std::mem::take(&mut st.missed_overflow);
            if overflowed {
                // The order is lost anyway (the map is refilled); collect afresh from here.
                st.missed.clear();
                st.logged.clear();
                st.held_bytes = 0;
            }
            (was, overflowed)
        };
        let fail = |e: NodeError| {
            let mut st = lock(&w.state);
            st.reconciling = was_reconciling;
            if !was_reconciling {
                st.missed.clear();
                st.logged.clear();
                st.held_bytes = 0;
            }
            st.missed_overflow |= overflowed;
            e
        };
        let seen = self.hooked_index.load(Ordering::Acquire);
        if !view.wait_applied(seen, Duration::from_secs(30)).await {
            return Err(fail(NodeError::Timeout(format!(
                "the state machine did not reach index {seen} to reconcile map {name}"
            ))));
        }
        let read_index = view.applied_index();
        let read = || -> Result<_> {
            let committed: HashMap<Vec<u8>, Vec<u8>> = view
                .scan(name, None, usize::MAX)
                .map_err(NodeError::from)?
                .into_iter()
                .collect();
            let kernel: HashMap<Vec<u8>, Vec<u8>> = kmap
                .walk()
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .into_map();
            Ok((committed, kernel))
        };
        let (committed, kernel) = read().map_err(fail)?;
        // Events of the new map flow before anything is written to it, so that the applier's
        // writes below meet their echoes.
        self.track(name, old_id, id);
        let proposals = {
            let mut st = lock(&w.state);
            if st.missed_overflow {
                // Changes after the read were dropped: try again (the map will be refilled).
                drop(st);
                return Err(fail(NodeError::Unavailable(format!(
                    "too many changes arrived while reconciling map {name}; retrying"
                ))));
            }
            st.pending.clear();
            st.committed_while_pending.clear();
            st.retry.clear();
            st.alone.clear();
            st.touched.clear();
            st.scanning = false;
            st.shadow = shadow_from(committed);
            let base = st.base.take();
            let overflow = overflowed || std::mem::take(&mut st.missed_overflow);
            let missed = std::mem::take(&mut st.missed);
            let logged = std::mem::take(&mut st.logged);
            st.held_bytes = 0;
            let proposals = match recorded {
                Some(r) if r == id && !overflow => {
                    // The map outlived the daemon: a three-way merge. Base: the committed
                    // contents when the daemon started; the kernel now; the log since. A key
                    // whose kernel value differs from the base and is none the log gave it since
                    // was changed while the daemon was down: capture it. Everything else takes
                    // the committed value.
                    // Without a recorded base the committed contents are the shadow itself.
                    let since_base = match &base {
                        Some(base) => diff(base, &kernel),
                        None => diff(&st.shadow, &kernel),
                    };
                    let local: Vec<_> = since_base
                        .into_iter()
                        .filter(|c| {
                            !logged
                                .get(&c.key)
                                .is_some_and(|vals| vals.contains(&c.value))
                        })
                        .collect();
                    let local_keys: HashSet<&[u8]> =
                        local.iter().map(|c| c.key.as_slice()).collect();
                    let fixes: Vec<_> = diff(&kernel, &st.shadow)
                        .into_iter()
                        .filter(|c| !local_keys.contains(c.key.as_slice()))
                        .collect();
                    let errors = self.write_all(&mut st, &kmap, &fixes);
                    tracing::info!(map = %name, id, local_changes = local.len(), written = fixes.len(), errors, "kernel map outlived the daemon; proposing changes made while it was down");
                    local
                }
                Some(_) => {
                    // The owning program recreated the map (or the changes held for it
                    // overflowed): fill it from the committed state by diff, never clearing it
                    // first.
                    let fixes = diff(&kernel, &st.shadow);
                    let errors = self.write_all(&mut st, &kmap, &fixes);
                    self.metrics
                        .scan_repairs
                        .get_or_create(&label(name))
                        .inc_by(fixes.len() as u64);
                    tracing::info!(map = %name, id, written = fixes.len(), errors, "kernel map was recreated; filled it from the committed state");
                    Vec::new()
                }
                None => {
                    // First sight on this node: adopt. Entries only the kernel has (or holds with
                    // another value) are proposed; committed entries it lacks are written. Nothing
                    // is deleted on either side.
                    let (ours, theirs): (Vec<_>, Vec<_>) = diff(&st.shadow, &kernel)
                        .into_iter()
                        .partition(|c| c.value.is_some());
                    let writes: Vec<_> = theirs
                        .into_iter()
                        .map(|c| raftmap_ebpf_hooks::KernelChange {
                            value: st.shadow.get(c.key.as_slice()).cloned(),
                            key: c.key,
                        })
                        .collect();
                    let errors = self.write_all(&mut st, &kmap, &writes);
                    tracing::info!(map = %name, id, proposed = ours.len(), written = writes.len(), errors, "adopted kernel map");
                    ours
                }
            };
            let proposals = self.mark_captured(&mut st, proposals);
            st.entries = kernel.len() as u64;
            st.kmap = Some(kmap);
            st.reconciling = false;
            // Changes committed after the state above was read, in log order.
            for m in missed {
                match m {
                    Missed::Change {
                        index,
                        captured_here,
                        key,
                        value,
                    } if index > read_index => self.apply_changes(
                        &mut st,
                        name,
                        captured_here,
                        vec![(&key, value.as_deref())],
                    ),
                    Missed::Snapshot { index, contents } if index > read_index => {
                        self.install(&mut st, name, contents)
                    }
                    _ => {}
                }
            }
            proposals
        };
        self.save_id(name, id);
        self.propose(name, w, view, batcher, proposals).await
    }

    /// Writes changes into a kernel map; a key whose write fails takes the kernel's actual value
    /// in the shadow. Returns how many failed.
    fn write_all(
        &self,
        st: &mut MapState,
        kmap: &KernelMap,
        changes: &[raftmap_ebpf_hooks::KernelChange],
    ) -> usize {
        let mut errors = 0;
        for c in changes {
            st.note_applied(&c.key);
            if self.write_kernel(kmap, &c.key, c.value.as_deref()).is_err() {
                Self::resync_key(st, kmap, &c.key);
                errors += 1;
            }
        }
        errors
    }

    /// One scan: capture what changed in the kernel since the shadow.
    async fn scan(
        self: &Arc<Self>,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
    ) -> Result<()> {
        let (kmap, mut retry) = {
            let mut st = lock(&w.state);
            let Some(kmap) = st.kmap.clone() else {
                return Ok(());
            };
            st.scanning = true;
            st.touched.clear();
            (kmap, st.retry.clone())
        };
        // The walk runs without the lock, on a thread of its own at background priority: a
        // large map takes tens of milliseconds of syscalls (the kernel visits every bucket),
        // which must not delay the node's replication on a busy machine. Keys the applier
        // writes meanwhile are recorded in `touched` and left out of this diff.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let walked = match std::thread::Builder::new()
            .name("raftmap-scan".into())
            .spawn(move || {
                if let Err(e) = raftmap_ebpf_hooks::set_thread_background_priority() {
                    tracing::debug!(error = %e, "scan thread keeps its priority");
                }
                let _ = tx.send(kmap.walk().map_err(|e| e.to_string()));
            }) {
            Ok(_) => rx
                .await
                .unwrap_or_else(|_| Err("the scan thread ended without an answer".into())),
            Err(e) => Err(format!("cannot start a scan thread: {e}")),
        };
        let kernel = match walked {
            Ok(e) => e,
            Err(e) => {
                lock(&w.state).scanning = false;
                tracing::warn!(map = %name, error = %e, "scan failed");
                return Ok(());
            }
        };
        self.metrics
            .entries
            .get_or_create(&label(name))
            .set(kernel.len() as i64);
        lock(&w.state).entries = kernel.len() as u64;
        // Compare in slices, taking the map's lock for one slice at a time: the applier (which
        // needs the lock for every committed entry) waits for a slice, not for the whole map.
        let mut differ = Vec::new();
        let mut found = 0usize;
        let mut items = kernel.iter();
        while items.len() > 0 {
            {
                let st = lock(&w.state);
                for (k, v) in items.by_ref().take(SCAN_SLICE) {
                    let known = st.shadow.get(k);
                    found += usize::from(known.is_some());
                    // A proposal to try again: whatever the kernel holds now.
                    let again = !retry.is_empty() && retry.remove(k);
                    if known.map(Vec::as_slice) != Some(v) || again {
                        differ.push(KernelChange {
                            key: k.to_vec(),
                            value: Some(v.to_vec()),
                        });
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        // Entries gone from the kernel map. Every key the shadow gained while the walk ran is in
        // `touched`, so a shadow larger than the keys found plus the touched ones certainly lost
        // some to the kernel; otherwise every tenth scan looks regardless (a busy map always has
        // touched keys that could hide a deletion). The kernel's key set is built without the
        // map's lock: the applier waits for no more than the shadow pass.
        let look_for_deletes = {
            let st = lock(&w.state);
            st.shadow.len() > found + st.touched.len() || (st.scans + 1) % 10 == 0
        };
        let kernel_keys: Option<HashSet<&[u8]>> =
            look_for_deletes.then(|| kernel.iter().map(|(k, _)| k).collect());
        let changes = {
            let mut st = lock(&w.state);
            st.scanning = false;
            let touched = std::mem::take(&mut st.touched);
            st.scans += 1;
            if let Some(kernel_keys) = &kernel_keys {
                differ.extend(
                    st.shadow
                        .keys()
                        .filter(|k| !kernel_keys.contains(k.as_slice()))
                        .map(|k| KernelChange {
                            key: k.to_vec(),
                            value: None,
                        }),
                );
            }
            // Proposals to try again for keys now absent from the kernel: a delete (unless
            // the deletion pass above found it already).
            if !retry.is_empty() {
                let listed: HashSet<&[u8]> = differ.iter().map(|c| c.key.as_slice()).collect();
                let absent: Vec<Vec<u8>> = retry
                    .into_iter()
                    .filter(|k| !listed.contains(k.as_slice()))
                    .collect();
                differ.extend(
                    absent
                        .into_iter()
                        .map(|key| KernelChange { key, value: None }),
                );
            }
            differ.retain(|c| !touched.contains(&c.key));
            // Deletes first: a full map that lost one key and gained another between two scans
            // must not see the new key before the room for it.
            differ.sort_by(|a, b| (a.value.is_some(), &a.key).cmp(&(b.value.is_some(), &b.key)));
            let changes = self.mark_captured(&mut st, differ);
            if !changes.is_empty() && self.backend() != Backend::Scan {
                // Found by the scan although events are on: in-place writes, BPF programs'
                // writes the backend cannot see, or lost events.
                self.metrics
                    .scan_repairs
                    .get_or_create(&label(name))
                    .inc_by(changes.len() as u64);
            }
            changes
        };
        // Not waiting for the outcomes: a scan's pause is a share of its own time, not of
        // the time a proposal may wait for a leader.
        self.propose_detached(name, view, batcher, changes).await;
        Ok(())
    }

    /// Captured local writes that the applier overwrote before their events arrived: the
    /// applier wrote the key a moment ago, and the kernel now holds what the applier wrote
    /// (the shadow's value) rather than the captured one. The local write is newer in the log's
    /// terms (it commits after the value the applier wrote), so the kernel must get it back;
    /// left alone, the next scan would take the applier's stale value for a new local change
    /// and the local write would be lost. (Costs a lookup, only for keys both written here and
    /// applied from the log within milliseconds.)
    fn overwritten_captures(&self, st: &MapState, fresh: &[KernelChange]) -> Vec<KernelChange> {
        let Some(kmap) = st.kmap.as_ref() else {
            return Vec::new();
        };
        fresh
            .iter()
            .filter(|c| st.applied_recently(&c.key))
            .filter(|c| match kmap.lookup(&c.key) {
                Ok(now) => now != c.value && now.as_ref() == st.shadow.get(c.key.as_slice()),
                Err(_) => false,
            })
            .map(|c| KernelChange {
                key: c.key.clone(),
                value: c.value.clone(),
            })
            .collect()
    }

    /// Writes captured values back over the applier's stale ones (see
    /// [`Self::overwritten_captures`]).
    fn restore(&self, st: &mut MapState, name: &str, changes: Vec<KernelChange>) {
        if changes.is_empty() {
            return;
        }
        let Some(kmap) = st.kmap.clone() else { return };
        tracing::debug!(map = %name, keys = changes.len(), "the applier overwrote local writes before they were captured; writing them back");
        self.metrics
            .restored
            .get_or_create(&label(name))
            .inc_by(changes.len() as u64);
        self.write_all(st, &kmap, &changes);
    }

    /// Records captured changes in the shadow and marks them pending; returns them with their
    /// capture generation, ready to propose.
    fn mark_captured(
        &self,
        st: &mut MapState,
        changes: Vec<raftmap_ebpf_hooks::KernelChange>,
    ) -> Vec<Captured> {
        changes
            .into_iter()
            .map(|c| {
                apply_to(&mut st.shadow, &c.key, c.value.as_deref());
                if st.scanning {
                    st.touched.insert(c.key.clone());
                }
                // A new capture supersedes a proposal waiting to be tried again; one that was in
                // a refused batch goes alone.
                if !st.retry.is_empty() {
                    st.retry.remove(&c.key);
                }
                let alone = !st.alone.is_empty() && st.alone.remove(&c.key);
                let gen = self.gen.fetch_add(1, Ordering::Relaxed);
                st.pending.insert(
                    c.key.clone(),
                    Mark {
                        value: c.value.clone(),
                        gen,
                    },
                );
                Captured {
                    change: c,
                    gen,
                    alone,
                }
            })
            .collect()
    }

    async fn propose(
        &self,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) -> Result<()> {
        let queued = self.enqueue(name, batcher, changes).await;
        self.settle_outcomes(name, w, view, queued).await;
        Ok(())
    }

    /// Like [`Self::propose`], but returns once the changes are queued (in capture order), and
    /// settles their marks when their outcomes arrive: the capture loop goes on reading events
    /// while earlier changes are on their way through the log, and group commit takes whatever
    /// it read meanwhile into the next entry.
    async fn propose_detached(
        self: &Arc<Self>,
        name: &str,
        view: &StateView,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) {
        let queued = self.enqueue(name, batcher, changes).await;
        if queued.is_empty() {
            return;
        }
        let (this, view, name) = (self.clone(), view.clone(), name.to_string());
        tokio::spawn(async move {
            if let Some(w) = this.maps.get(&name) {
                this.settle_outcomes(&name, w, &view, queued).await;
            }
        });
    }

    /// Queues captured changes as client batches within the cluster's size limits, in order.
    async fn enqueue(
        &self,
        name: &str,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) -> Vec<(Vec<Captured>, Result<Ticket>)> {
        if changes.is_empty() {
            return Vec::new();
        }
        self.metrics
            .captured
            .get_or_create(&label(name))
            .inc_by(changes.len() as u64);
        let mut queued = Vec::new();
        for chunk in client_batches(changes) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|c| match &c.change.value {
                    Some(v) => Op::Put {
                        map: name.to_string(),
                        key: c.change.key.clone(),
                        value: v.clone(),
                    },
                    None => Op::Delete {
                        map: name.to_string(),
                        key: c.change.key.clone(),
                    },
                })
                .collect();
            let ticket = batcher.enqueue(ops, Source::Kernel).await;
            queued.push((chunk, ticket));
        }
        queued
    }

    /// Waits for the outcomes of queued changes and settles their marks.
    async fn settle_outcomes(
        &self,
        name: &str,
        w: &Watched,
        view: &StateView,
        queued: Vec<(Vec<Captured>, Result<Ticket>)>,
    ) {
        let mut retry = false;
        for (chunk, ticket) in queued {
            let res = match ticket {
                Ok(t) => t.wait().await,
                Err(e) => Err(e),
            };
            let refused = match res {
                Ok(out) => match out.outcome {
                    BatchOutcome::Applied => {
                        // Committed at `out.index`: each key settles once the applier has
                        // reached that index here (now, if it already has; otherwise the
                        // apply hook does it when it gets there).
                        let mut st = lock(&w.state);
                        let mut settle = Vec::new();
                        for c in &chunk {
                            if st.pending.get(&c.change.key).map(|m| m.gen) == Some(c.gen) {
                                settle.push((c.change.key.clone(), c.gen));
                            }
                        }
                        st.commits.entry(out.index).or_default().extend(settle);
                        if self.hooked_index.load(Ordering::Acquire) >= out.index {
                            self.settle_committed(&mut st, out.index);
                        }
                        continue;
                    }
                    BatchOutcome::Rejected(e) if chunk.len() > 1 || e.is_size_limit() => {
                        // A batch is refused as a whole: find the changes the cluster refuses
                        // by proposing each alone; none is undone for another's sake, nor for
                        // the size of the batch it happened to be in.
                        tracing::info!(map = %name, keys = chunk.len(), reason = %e, "the cluster refused a batch of captured changes; proposing each of them alone");
                        let mut st = lock(&w.state);
                        for c in &chunk {
                            if st.pending.get(&c.change.key).map(|m| m.gen) == Some(c.gen) {
                                st.retry.insert(c.change.key.clone());
                                st.alone.insert(c.change.key.clone());
                            }
                        }
                        retry = true;
                        continue;
                    }
                    BatchOutcome::Rejected(e) => {
                        tracing::warn!(map = %name, reason = %e, "the cluster refused a captured change; undoing it here");
                        let mut st = lock(&w.state);
                        st.refusals += 1;
                        st.last_refusal = Some(e.to_string());
                        self.metrics.refused.get_or_create(&label(name)).inc();
                        true
                    }
                    BatchOutcome::CasFailed { .. } => false,
                },
                Err(e) => {
                    tracing::warn!(map = %name, keys = chunk.len(), error = %e, "captured changes not committed; the next scan retries them");
                    false
                }
            };
            // Not committed (or not known to be): a scan soon proposes the keys again.
            if !refused {
                let mut st = lock(&w.state);
                for c in &chunk {
                    if st.pending.get(&c.change.key).map(|m| m.gen) == Some(c.gen) {
                        st.retry.insert(c.change.key.clone());
                    }
                }
                self.metrics
                    .uncommitted
                    .get_or_create(&label(name))
                    .inc_by(chunk.len() as u64);
                retry = true;
                continue;
            }
            // Refused: read the committed values once everything the applier has seen is
            // persisted, then end the marks and undo the changes.
            view.wait_applied(
                self.hooked_index.load(Ordering::Acquire),
                Duration::from_secs(10),
            )
            .await;
            let mut committed = Vec::with_capacity(chunk.len());
            for c in &chunk {
                committed.push(view.get(name, &c.change.key));
            }
            let mut st = lock(&w.state);
            for (c, view_value) in chunk.iter().zip(committed) {
                self.settle_refused(&mut st, name, c, view_value);
            }
        }
        if retry {
            // Not at once: a leader may be on its way, and a write that failed at once
            // (leader unreachable) would otherwise be retried in a tight loop.
            tokio::time::sleep(RETRY_AFTER).await;
            self.scan_now.notify_one();
        }
    }

    /// Settles every key whose capture committed at or before `index`: the mark ends, and the
    /// kernel takes the log's last value for the key (which the applier recorded while the key
    /// was pending) if that differs from what the kernel holds.
    fn settle_committed(&self, st: &mut MapState, index: u64) {
        let later = st.commits.split_off(&(index + 1));
        let due = std::mem::replace(&mut st.commits, later);
        for (key, gen) in due.into_values().flatten() {
            // Only the capture that committed settles its key; a newer one keeps the mark.
            if st.pending.get(&key).map(|m| m.gen) != Some(gen) {
                continue;
            }
            st.pending.remove(&key);
            let Some(last) = st.committed_while_pending.remove(&key) else {
                continue;
            };
            if st.shadow.get(key.as_slice()) != last.as_ref() {
                apply_to(&mut st.shadow, &key, last.as_deref());
                if st.scanning {
                    st.touched.insert(key.clone());
                }
                if let Some(kmap) = st.kmap.clone() {
                    st.note_applied(&key);
                    if self.write_kernel(&kmap, &key, last.as_deref()).is_err() {
                        Self::resync_key(st, &kmap, &key);
                    }
                }
            }
        }
    }

    /// Ends the mark of a change the cluster refused, if it is still the key's latest capture,
    /// and undoes it in the kernel: the key goes back to its committed value.
    fn settle_refused(
        &self,
        st: &mut MapState,
        name: &str,
        c: &Captured,
        view_value: std::result::Result<Option<Vec<u8>>, raftmap_storage::StorageError>,
    ) {
        let key = &c.change.key;
        if st.pending.get(key).map(|m| m.gen) != Some(c.gen) {
            return; // a newer capture of the key settles it
        }
        // The applier's record is newer than the persisted state when it exists.
        let committed = match st.committed_while_pending.get(key) {
            Some(v) => v.clone(),
            None => match view_value {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(map = %name, error = %e, "reading a committed value to settle a key; the mark stays");
                    return;
                }
            },
        };
        st.pending.remove(key);
        st.committed_while_pending.remove(key);
        st.retry.remove(key);
        apply_to(&mut st.shadow, key, committed.as_deref());
        if st.scanning {
            st.touched.insert(key.clone());
        }
        if let Some(kmap) = st.kmap.clone() {
            st.note_applied(key);
            if self.write_kernel(&kmap, key, committed.as_deref()).is_err() {
                Self::resync_key(st, &kmap, key);
            }
        }
    }
}

/// Capture events sorted out: the applier's echoes dropped, LRU evictions attributed.
#[derive(Debug, Default)]
struct Sorted {
    /// Real changes to propose, in order (evictions among them replicate as deletes).
    accepted: Vec<CaptureEvent>,
    /// Evictions the applier's own writes caused: they stay local.
    applier_evicted: Vec<CaptureEvent>,
    echoes: u64,
}

/// Most evictions held over for the next batch while their cause is unknown.
const HELD_EVICTIONS: usize = 1024;

/// Drops the applier's echoes and attributes LRU evictions. An eviction happens inside the
/// update that needed room, and is reported before it: it is held until the same thread's next
/// change to the same map. If that change is the applier's own write, the write caused it and
/// it stays local (no cascade of deletes across the cluster); otherwise it replicates as a
/// delete. Evictions not yet followed by a change stay in `held` for the next batch (at most
/// `HELD_EVICTIONS`; older ones are released as deletes).
fn attribute_evictions(
    events: Vec<CaptureEvent>,
    held: &mut Vec<CaptureEvent>,
    echoes: &mut EchoFilter,
) -> Sorted {
    let mut out = Sorted::default();
    for ev in events {
        if ev.evicted {
            held.push(ev);
            continue;
        }
        let echo = echoes.is_echo(&ev);
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(held)
            .into_iter()
            .partition(|h| h.tid == ev.tid && h.map_id == ev.map_id);
        *held = others;
        if echo {
            out.echoes += 1;
            out.applier_evicted.extend(mine);
        } else {
            out.accepted.extend(mine);
            out.accepted.push(ev);
        }
    }
    if held.len() > HELD_EVICTIONS {
        out.accepted
            .extend(held.drain(..held.len() - HELD_EVICTIONS));
    }
    out
}

/// A captured change and its capture generation.
#[derive(Debug)]
struct Captured {
    change: raftmap_ebpf_hooks::KernelChange,
    gen: u64,
    /// Proposed in a client batch of its own (its last batch was refused).
    alone: bool,
}

impl Captured {
    fn payload_bytes(&self) -> usize {
        self.change.key.len() + self.change.value.as_ref().map_or(0, Vec::len)
    }
}

/// Cuts captured changes, in order, into client batches the cluster takes by size (the state
/// machine's op and byte limits); a change marked `alone` gets a batch of its own.
fn client_batches(changes: Vec<Captured>) -> Vec<Vec<Captured>> {
    let mut out = Vec::new();
    let mut run = Vec::new();
    for c in changes {
        if c.alone {
            out.extend(batch_runs(
                std::mem::take(&mut run),
                Captured::payload_bytes,
            ));
            out.push(vec![c]);
        } else {
            run.push(c);
        }
    }
    out.extend(batch_runs(run, Captured::payload_bytes));
    out
}

fn apply_to(shadow: &mut Shadow, key: &[u8], value: Option<&[u8]>) {
    match value {
        // An existing key keeps its buffers: no allocation for the common in-place update.
        Some(v) => match shadow.get_mut(key) {
            Some(old) => {
                old.clear();
                old.extend_from_slice(v);
            }
            None => {
                shadow.insert(ShadowKey::from_slice(key), v.to_vec());
            }
        },
        None => {
            shadow.remove(key);
        }
    }
}

impl KernelSync {
    /// Applies committed changes (in log order) to a watched map's kernel map and shadow, with
    /// as few syscalls as possible: repeated changes to a key collapse into the last one, puts
    /// go in one BPF_MAP_UPDATE_BATCH.
    fn apply_changes(
        &self,
        st: &mut MapState,
        map: &str,
        captured_here: bool,
        changes: Vec<KeyChange<'_>>,
    ) {
        // Several changes to one key: only the last counts.
        let superseded = {
            let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(changes.len());
            for (i, (k, _)) in changes.iter().enumerate() {
                last.insert(k, i);
            }
            let mut superseded = vec![false; changes.len()];
            if last.len() < changes.len() {
                for (i, (k, _)) in changes.iter().enumerate() {
                    superseded[i] = last.get(k) != Some(&i);
                }
            }
            superseded
        };
        let mut puts: Vec<(&[u8], &[u8])> = Vec::new();
        let mut deletes: Vec<&[u8]> = Vec::new();
        // Only captures from events can meet an applier write that went over them (see
        // `overwritten_captures`): with the scan alone, nothing is noted on this path.
        let note = self.backend() != Backend::Scan;
        for (i, (key, value)) in changes.into_iter().enumerate() {
            if superseded[i] {
                continue;
            }
            if let Some(mark) = st.pending.get(key) {
                if captured_here && mark.value.as_deref() == value {
                    // This node's latest capture of the key committed: settling leaves the
                    // kernel as it is, and any older committed value noted is superseded.
                    st.committed_while_pending.remove(key);
                    continue;
                }
                // A local change to the key is on its way through the log: it is newer than
                // this one (or is this one). Remember where the log is; settling the key ends
                // there.
                if !captured_here {
                    self.metrics.deferred.get_or_create(&label(map)).inc();
                }
                st.committed_while_pending
                    .insert(key.to_vec(), value.map(<[u8]>::to_vec));
                continue;
            }
            if captured_here && st.shadow.get(key).map(Vec::as_slice) == value {
                continue; // our own capture: the kernel has it
            }
            apply_to(&mut st.shadow, key, value);
            if note {
                st.note_applied(key);
            }
            if st.scanning {
                st.touched.insert(key.to_vec());
            }
            match value {
                Some(v) => puts.push((key, v)),
                None => deletes.push(key),
            }
        }
        let Some(kmap) = st.kmap.clone() else { return };
        let (mut ok, mut failed) = (0u64, Vec::new());
        if !puts.is_empty() {
            let register = self.reports_own_writes(&kmap);
            let id = kmap.layout().id;
            if register {
                let mut echoes = self.echoes.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in &puts {
                    echoes.register(id, k, Some(v));
                }
            }
            let done = match kmap.update_batch(&puts) {
                Ok(()) => puts.len(),
                Err((n, _)) => n.min(puts.len()),
            };
            ok += done as u64;
            // What the batch did not write is retried one by one, for a per-key error.
            for (k, v) in &puts[done..] {
                if register {
                    self.echoes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unregister(id, k, Some(v));
                }
                match self.write_kernel(&kmap, k, Some(v)) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push((k.to_vec(), e)),
                }
            }
        }
        for k in &deletes {
            match self.write_kernel(&kmap, k, None) {
                Ok(()) => ok += 1,
                Err(e) => failed.push((k.to_vec(), e)),
            }
        }
        self.metrics.applied.get_or_create(&label(map)).inc_by(ok);
        if let Some((_, e)) = failed.first() {
            self.metrics
                .apply_errors
                .get_or_create(&label(map))
                .inc_by(failed.len() as u64);
            tracing::warn!(map = %map, failed = failed.len(), error = %e, "applying committed changes to the kernel map failed");
        }
        for (k, _) in &failed {
            Self::resync_key(st, &kmap, k);
        }
    }

    /// Installs a snapshot's contents into a kernel map by diff: update what differs, delete
    /// what is extra, never clear first. Keys with a local change on its way keep it.
    fn install(&self, st: &mut MapState, name: &str, contents: HashMap<Vec<u8>, Vec<u8>>) {
        let Some(kmap) = st.kmap.clone() else { return };
        let kernel: HashMap<Vec<u8>, Vec<u8>> = match kmap.walk() {
            Ok(k) => k.into_map(),
            Err(e) => {
                tracing::warn!(map = %name, error = %e, "cannot read the kernel map to install a snapshot");
                return;
            }
        };
        let pending: Vec<(Vec<u8>, Mark)> = st
            .pending
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for (k, _) in &pending {
            st.committed_while_pending
                .insert(k.clone(), contents.get(k).cloned());
        }
        let fixes: Vec<_> = diff(&kernel, &contents)
            .into_iter()
            .filter(|c| !st.pending.contains_key(&c.key))
            .collect();
        st.shadow = shadow_from(contents);
        for (k, m) in pending {
            apply_to(&mut st.shadow, &k, m.value.as_deref());
        }
        if st.scanning {
            st.touched.extend(fixes.iter().map(|c| c.key.clone()));
        }
        let errors = self.write_all(st, &kmap, &fixes);
        self.metrics
            .applied
            .get_or_create(&label(name))
            .inc_by(fixes.len() as u64);
        self.metrics
            .apply_errors
            .get_or_create(&label(name))
            .inc_by(errors as u64);
        tracing::info!(map = %name, written = fixes.len(), errors, "installed snapshot into kernel map by diff");
    }
}

impl KernelSync {
    /// The applier has processed everything up to `index` (a whole entry, or a snapshot):
    /// settle the captures committed by then, and let proposers know.
    fn after_apply(&self, index: u64) {
        // Published first: a proposer that takes a map's lock after this settles its keys
        // itself; one that took it before left its commit index for the loop below.
        self.hooked_index.fetch_max(index, Ordering::AcqRel);
        for w in self.maps.values() {
            let mut st = lock(&w.state);
            if !st.pending.is_empty() {
                self.settle_committed(&mut st, index);
            }
        }
    }
}

impl KernelSync {
    /// The cluster dropped a map this node watches: the kernel map is left as it is, and no
    /// longer synced.
    fn dropped(&self, map: &str) {
        let Some(w) = self.maps.get(map) else { return };
        let mut st = lock(&w.state);
        let reason = format!(
            "the cluster dropped map {map}; {} is left as it is and no longer synced",
            w.spec.location()
        );
        tracing::warn!(map = %map, "{reason}");
        st.refused = Some(reason);
        st.reconciling = false;
        st.pending.clear();
        st.committed_while_pending.clear();
        st.retry.clear();
        st.missed.clear();
        st.logged.clear();
        st.held_bytes = 0;
    }
}

impl ApplyHook for KernelSync {
    fn on_batch(&self, index: u64, origin: NodeId, source: Source, changes: &[Change]) {
        // Only this node's own captures are already in its kernel maps.
        let captured_here = source == Source::Kernel && origin == self.me;
        let mut by_map: BTreeMap<&str, Vec<KeyChange<'_>>> = BTreeMap::new();
        for c in changes {
            let (map, key, value) = match c {
                Change::Put { map, key, value } => (map, key, Some(value.as_slice())),
                Change::Delete { map, key } => (map, key, None),
                Change::Declare(_) => continue,
                Change::Drop(map) => {
                    self.dropped(map);
                    continue;
                }
            };
            if self.maps.contains_key(map) {
                by_map
                    .entry(map.as_str())
                    .or_default()
                    .push((key.as_slice(), value));
            }
        }
        for (map, changes) in by_map {
            let Some(w) = self.maps.get(map) else {
                continue;
            };
            let mut st = lock(&w.state);
            if st.refused.is_some() {
                continue;
            }
            if st.reconciling {
                st.hold(changes.into_iter().map(|(key, value)| Missed::Change {
                    index,
                    captured_here,
                    key: key.to_vec(),
                    value: value.map(<[u8]>::to_vec),
                }));
                continue;
            }
            if st.kmap.is_none() {
                continue; // reconciliation reads the committed state when the map appears
            }
            self.apply_changes(&mut st, map, captured_here, changes);
        }
    }

    fn on_entry_applied(&self, index: u64) {
        self.after_apply(index);
    }

    fn on_snapshot(&self, index: u64, maps: &MapContents) {
        for (name, w) in &self.maps {
            let contents: HashMap<Vec<u8>, Vec<u8>> = maps
                .get(name)
                .map(|v| v.iter().cloned().collect())
                .unwrap_or_default();
            let mut st = lock(&w.state);
            if st.refused.is_some() {
                continue;
            }
            if st.reconciling {
                // A snapshot supersedes the changes held before it (its values stay logged).
                st.missed.retain(|m| !matches!(m, Missed::Change { .. }));
                st.hold([Missed::Snapshot { index, contents }]);
                continue;
            }
            self.install(&mut st, name, contents);
        }
        self.after_apply(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(map_id: u32, tid: u32, key: u8, value: Option<u8>, evicted: bool) -> CaptureEvent {
        CaptureEvent {
            map_id,
            key: vec![key],
            value: value.map(|v| vec![v]),
            evicted,
            tid,
        }
    }

    #[test]
    fn evictions_caused_by_the_applier_stay_local_others_replicate() {
        let mut echoes = EchoFilter::default();
        echoes.register(1, &[10], Some(&[1]));
        let mut held = Vec::new();
        // Thread 7 (the applier) evicts key 3 to make room for its write of key 10; thread 9
        // (a BPF program in softirq, say) evicts key 4 for its own write of key 11.
        let sorted = attribute_evictions(
            vec![
                ev(1, 7, 3, None, true),
                ev(1, 9, 4, None, true),
                ev(1, 9, 11, Some(2), false),
                ev(1, 7, 10, Some(1), false),
            ],
            &mut held,
            &mut echoes,
        );
        assert_eq!(sorted.echoes, 1);
        assert_eq!(sorted.applier_evicted, vec![ev(1, 7, 3, None, true)]);
        assert_eq!(
            sorted.accepted,
            vec![ev(1, 9, 4, None, true), ev(1, 9, 11, Some(2), false)]
        );
        assert!(held.is_empty());
        assert_eq!(echoes.outstanding(), 0);
    }

    #[test]
    fn an_eviction_waits_for_its_cause_across_batches() {
        let mut echoes = EchoFilter::default();
        let mut held = Vec::new();
        let first = attribute_evictions(vec![ev(1, 7, 3, None, true)], &mut held, &mut echoes);
        assert!(first.accepted.is_empty() && first.applier_evicted.is_empty());
        assert_eq!(held.len(), 1);
        echoes.register(1, &[10], Some(&[1]));
        let second =
            attribute_evictions(vec![ev(1, 7, 10, Some(1), false)], &mut held, &mut echoes);
        assert_eq!(second.applier_evicted, vec![ev(1, 7, 3, None, true)]);
        assert!(second.accepted.is_empty());
    }

    #[test]
    fn a_write_equal_to_a_registered_one_by_someone_else_is_consumed_once() {
        // The applier registered one write of key 10; a program writes the same bytes too.
        // One event is the echo, the other is kept: the map holds that value either way.
        let mut echoes = EchoFilter::default();
        echoes.register(1, &[10], Some(&[1]));
        let mut held = Vec::new();
        let sorted = attribute_evictions(
            vec![ev(1, 7, 10, Some(1), false), ev(1, 9, 10, Some(1), false)],
            &mut held,
            &mut echoes,
        );
        assert_eq!(sorted.echoes, 1);
        assert_eq!(sorted.accepted.len(), 1);
    }
}
