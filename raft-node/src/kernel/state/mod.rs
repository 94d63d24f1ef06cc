//! One map's sync state: the shadow (what the kernel map is believed to hold), the marks
//! (local changes on their way through the log) and what reconciliation holds. Its rules are
//! pure code in the two files under it: `rules.rs` (capture, commit, apply, settle, refusal,
//! snapshot) and `compare.rs` (the scan's and the reconciliation's comparisons of the kernel
//! map with the shadow). Nothing here touches a kernel map or the log: a rule that changes what
//! the kernel must hold returns the writes, and the one writer (`writer.rs`) makes them. Fields
//! marked `pub(super)` are read or set by the rest of the sync; the others only by the rules.
//!
//! The rules, each defended by a scenario in `tests.rs`:
//! - a key with a mark is never written by the applier: the local value is newer than any
//!   committed value the node has yet to apply (no regression on the origin node); the last
//!   committed value is remembered and, when the mark settles, written if the log ended
//!   elsewhere;
//! - everything written or captured is in the shadow first, so a scan never takes the
//!   applier's writes for local changes (no echo);
//! - a change the cluster refuses alone is undone: the key goes back to its committed value;
//! - a snapshot is installed by diff, keys with marks keep their local values.

mod compare;
mod rules;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashSet};
use raftmap_ebpf_hooks::{KernelChange, Shadow, ShadowKey};

pub(super) use compare::Sighting;

use super::map_ops::MapOps;

/// A key and its new value (`None`: deleted), borrowed from the committed entry.
pub(super) type KeyChange<'a> = (&'a [u8], Option<&'a [u8]>);

/// Most key and value bytes held for a map that is not reconciled yet; past that they are
/// dropped and the map, once found, is filled from the committed state.
const HELD_BYTES_CAP: usize = 256 << 20;

/// How long a key the applier wrote counts as recently written: longer than a capture takes to
/// reach the daemon (the ring buffer is read within milliseconds).
const RECENT_APPLY: Duration = Duration::from_millis(100);

/// A local change on its way through the log.
#[derive(Debug, Clone)]
pub(super) struct Mark {
    pub value: Option<Vec<u8>>,
    /// Which capture of the key this is; only the latest one settles the key (when the
    /// applier reaches the index it committed at, see `MapState::commits`).
    pub gen: u64,
}

/// A committed change that arrived while its map was being reconciled.
#[derive(Debug)]
pub(super) enum Missed {
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

/// A captured change and its capture generation.
#[derive(Debug, Clone)]
pub(super) struct Captured {
    pub change: KernelChange,
    pub gen: u64,
    /// Proposed in a client batch of its own (its last batch was refused).
    pub alone: bool,
}

impl Captured {
    pub(in crate::kernel) fn payload_bytes(&self) -> usize {
        self.change.key.len() + self.change.value.as_ref().map_or(0, Vec::len)
    }
}

/// Writes a kernel map must get, borrowed. The writer makes the deletes first: a full map
/// needs the room before the new keys.
#[derive(Debug, Default)]
pub(super) struct Writes<'a> {
    pub deletes: Vec<&'a [u8]>,
    pub puts: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> Writes<'a> {
    pub(in crate::kernel) fn of(changes: &'a [KernelChange]) -> Self {
        let mut w = Writes::default();
        for c in changes {
            match &c.value {
                Some(v) => w.puts.push((&c.key, v)),
                None => w.deletes.push(&c.key),
            }
        }
        w
    }
}

#[derive(Debug, Default)]
pub(super) struct MapState {
    pub kmap: Option<Arc<dyn MapOps>>,
    /// Set while the map is being reconciled; committed changes are collected in `missed`
    /// meanwhile and applied once the reconciled state is in place.
    pub reconciling: bool,
    pub missed: Vec<Missed>,
    /// `missed` overflowed: the order of changes is lost.
    pub missed_overflow: bool,
    /// Key and value bytes held in `missed` and `logged`.
    held_bytes: usize,
    /// Every value the log gave each key while the map waited for reconciliation (snapshots
    /// included): a kernel value among them is not a change made while the daemon was down.
    pub logged: HashMap<Vec<u8>, Vec<Option<Vec<u8>>>>,
    /// The committed contents when the daemon started, before any entry was applied: what the
    /// kernel map held when the daemon last ran (the base of the three-way merge on restart).
    pub base: Option<HashMap<Vec<u8>, Vec<u8>>>,
    pub shadow: Shadow,
    /// Local changes on their way through the log.
    pub pending: HashMap<Vec<u8>, Mark>,
    /// For keys with a pending mark: the latest committed value the applier saw (and did not
    /// write, so as not to overwrite the newer local value). Settling the key writes it if the
    /// log ended somewhere else than the local value.
    pub committed_while_pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Captures known committed, by commit index: `(key, capture generation)`. Settling takes
    /// the due ones from the front instead of walking every pending mark.
    commits: BTreeMap<u64, Vec<(Vec<u8>, u64)>>,
    /// Pending keys whose proposal did not commit (or is not known to have): the next scan
    /// proposes the kernel's value again. The mark stays meanwhile, so that committed values
    /// this node has yet to apply (it may lag behind the log) do not go over the local one.
    pub retry: HashSet<Vec<u8>>,
    /// Keys in `retry` whose last proposal went in a batch the cluster refused: each is
    /// proposed in a batch of its own next, so that one refused change (a full map) is undone
    /// alone and never takes the others of its batch with it.
    alone: HashSet<Vec<u8>>,
    /// Local changes the cluster refused and that were undone here, and the last reason.
    pub refusals: u64,
    pub last_refusal: Option<String>,
    /// A scan is reading the kernel map: keys written or captured meanwhile go in `touched`
    /// and are left out of its diff.
    scanning: bool,
    touched: HashSet<Vec<u8>>,
    /// Scans done, for the occasional full look for deleted entries.
    scans: u64,
    /// Why the map is not synced (schema conflict, dropped by the cluster).
    pub refused: Option<String>,
    /// Why the map could not be opened the last time it was looked for.
    pub open_error: Option<String>,
    /// Entries the kernel map held at the last scan or reconcile.
    pub entries: u64,
    /// Keys the applier wrote in the last `RECENT_APPLY` to twice that (two generations).
    recently_applied: [HashSet<Vec<u8>>; 2],
    recent_since: Option<Instant>,
    /// Keys this node's kernel evicted from an LRU map to make room for the applier's writes
    /// (they stay committed), oldest first, at most `EVICTED_KEPT`: the first candidates when
    /// the cluster's copy of the map is full and a local change needs room (see
    /// `KernelSync::make_room`).
    pub evicted_here: std::collections::VecDeque<Vec<u8>>,
}

/// Most keys `MapState::evicted_here` remembers.
pub(super) const EVICTED_KEPT: usize = 65_536;

impl MapState {
    /// Records that the applier's write evicted `key` from this node's kernel map.
    pub fn evicted_by_applier(&mut self, key: Vec<u8>) {
        self.shadow.remove(key.as_slice());
        if self.evicted_here.len() >= EVICTED_KEPT {
            self.evicted_here.pop_front();
        }
        self.evicted_here.push_back(key);
    }
}

/// Sets `key` to `value` (`None`: absent) in a shadow.
pub(super) fn apply_to(shadow: &mut Shadow, key: &[u8], value: Option<&[u8]>) {
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

impl MapState {
    /// Records `value` for `key` in the shadow (and, while a scan reads the map, keeps the key
    /// out of its diff).
    pub(in crate::kernel) fn record(&mut self, key: &[u8], value: Option<&[u8]>) {
        apply_to(&mut self.shadow, key, value);
        self.touch(key);
    }

    fn touch(&mut self, key: &[u8]) {
        if self.scanning {
            self.touched.insert(key.to_vec());
        }
    }

    /// Notes that the applier wrote `key` just now.
    pub(in crate::kernel) fn note_applied(&mut self, key: &[u8]) {
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
    pub(in crate::kernel) fn applied_recently(&self, key: &[u8]) -> bool {
        self.recent_since
            .is_some_and(|t| t.elapsed() < 2 * RECENT_APPLY)
            && self.recently_applied.iter().any(|s| s.contains(key))
    }

    /// Whether `c` is still its key's latest capture.
    pub(in crate::kernel) fn is_latest(&self, c: &Captured) -> bool {
        self.pending.get(&c.change.key).map(|m| m.gen) == Some(c.gen)
    }

    /// Holds committed changes for a map being reconciled, and logs their values.
    pub(in crate::kernel) fn hold(&mut self, items: impl IntoIterator<Item = Missed>) {
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
                self.forget_held();
                self.missed_overflow = true;
                return;
            }
        }
    }

    /// Drops the committed changes held during a reconciliation.
    pub(in crate::kernel) fn forget_held(&mut self) {
        self.missed.clear();
        self.logged.clear();
        self.held_bytes = 0;
    }

    /// The map is no longer synced, for `reason` (schema conflict, dropped by the cluster).
    pub(in crate::kernel) fn stop_syncing(&mut self, reason: String) {
        self.refused = Some(reason);
        self.reconciling = false;
        self.pending.clear();
        self.committed_while_pending.clear();
        self.retry.clear();
        self.forget_held();
        self.base = None;
    }
}
