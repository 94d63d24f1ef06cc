//! Apply: the state machine's [`ApplyHook`] brings committed changes and snapshots here, in log
//! order. The rules decide what the kernel must get (nothing for this node's own captures, the
//! log's value for keys without a local change on its way) and the writer writes it. A map
//! being reconciled holds what arrives until its reconciled state is in place.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use foldhash::HashMap;
use raftmap_storage::{ApplyHook, Change, MapContents, NodeId, Source};

use super::state::{KeyChange, MapState, Missed, Writes};
use super::KernelSync;
use crate::lock::lock;

impl KernelSync {
    /// Applies committed changes (in log order) to a watched map's kernel map and shadow.
    pub(super) fn apply_changes(
        &self,
        st: &mut MapState,
        map: &str,
        captured_here: bool,
        changes: Vec<KeyChange<'_>>,
    ) {
        let (writes, deferred) = st.apply_committed(captured_here, changes);
        let label = self.label(map, st);
        if deferred > 0 {
            self.metrics.deferred.get_or_create(&label).inc_by(deferred);
        }
        let Some(kmap) = st.kmap.clone() else { return };
        let done = self.writer(kmap.as_ref()).write(st, &writes);
        self.metrics.applied.get_or_create(&label).inc_by(done.ok);
        if let Some(e) = &done.first_error {
            self.metrics
                .apply_errors
                .get_or_create(&label)
                .inc_by(done.failed);
            tracing::warn!(map = %map, failed = done.failed, error = %e, "applying committed changes to the kernel map failed");
        }
    }

    /// Installs a snapshot's contents into a kernel map by diff: update what differs, delete
    /// what is extra, never clear first. Keys with a local change on its way keep it.
    pub(super) fn install(
        &self,
        st: &mut MapState,
        name: &str,
        contents: HashMap<Vec<u8>, Vec<u8>>,
    ) {
        let Some(kmap) = st.kmap.clone() else { return };
        let kernel: HashMap<Vec<u8>, Vec<u8>> = match kmap.walk() {
            Ok(k) => k.into_map(),
            Err(e) => {
                tracing::warn!(map = %name, error = %e, "cannot read the kernel map to install a snapshot");
                return;
            }
        };
        let fixes = st.install(&kernel, contents);
        let done = self.writer(kmap.as_ref()).write(st, &Writes::of(&fixes));
        let label = self.label(name, st);
        self.metrics.applied.get_or_create(&label).inc_by(done.ok);
        self.metrics
            .apply_errors
            .get_or_create(&label)
            .inc_by(done.failed);
        tracing::info!(map = %name, written = fixes.len(), errors = done.failed, "installed snapshot into kernel map by diff");
    }

    /// Settles the keys whose captures committed at or before `index` (see
    /// `MapState::settle_committed`).
    pub(super) fn settle_committed(&self, st: &mut MapState, index: u64) {
        let writes = st.settle_committed(index);
        if let Some(kmap) = st.kmap.clone() {
            self.writer(kmap.as_ref()).write(st, &Writes::of(&writes));
        }
    }

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

    /// The cluster dropped a map this node watches: the kernel map is left as it is, and no
    /// longer synced.
    fn dropped(&self, map: &str) {
        let Some(w) = self.maps.get(map) else { return };
        let reason = format!(
            "the cluster dropped map {map}; {} is left as it is and no longer synced",
            w.spec.location()
        );
        tracing::warn!(map = %map, "{reason}");
        lock(&w.state).stop_syncing(reason);
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
