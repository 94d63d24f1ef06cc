//! The one kernel writer. Every write raftmap makes to a watched kernel map (committed changes,
//! snapshot installs, reconciliation fills, undoing a refused change, settling a key) is
//! decided by a rule in `rules.rs` and made here, under the map's state lock: deletes first
//! (room in a full map), puts in one `BPF_MAP_UPDATE_BATCH`, what the batch did not write one
//! by one. A key whose write fails takes the kernel's actual value in the shadow, or the next
//! scan would propose the difference (a delete of a committed key) to the whole cluster.

use std::sync::Mutex;

use raftmap_ebpf_hooks::{EchoFilter, HookError};

use super::map_ops::MapOps;
use super::state::{apply_to, MapState, Writes};
use crate::lock::lock;

/// Writes to one kernel map.
pub(super) struct Writer<'a> {
    pub kmap: &'a dyn MapOps,
    /// Where writes are registered as expected echoes, when the capture backend reports the
    /// applier's own writes (fexit).
    pub echoes: Option<&'a Mutex<EchoFilter>>,
    /// Note each written key as recently applied (event backends: a capture of the key that
    /// arrives right after may have been overwritten, see `capture.rs`).
    pub note: bool,
}

/// What a write did.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<HookError>,
}

impl Writer<'_> {
    /// Makes `w`, then brings the shadow of every key that failed back to the kernel's value.
    pub fn write(&self, st: &mut MapState, w: &Writes<'_>) -> Written {
        let mut out = Written::default();
        let mut failed: Vec<&[u8]> = Vec::new();
        let mut result = |key, res: Result<(), HookError>, out: &mut Written| match res {
            Ok(()) => out.ok += 1,
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert(e);
                failed.push(key);
            }
        };
        if self.note {
            for k in w.deletes.iter().chain(w.puts.iter().map(|(k, _)| k)) {
                st.note_applied(k);
            }
        }
        for k in &w.deletes {
            result(*k, self.one(k, None), &mut out);
        }
        if !w.puts.is_empty() {
            let id = self.kmap.layout().id;
            if let Some(echoes) = self.echoes {
                let mut echoes = lock(echoes);
                for (k, v) in &w.puts {
                    echoes.register(id, k, Some(v));
                }
            }
            let done = match self.kmap.update_batch(&w.puts) {
                Ok(()) => w.puts.len(),
                Err((n, _)) => n.min(w.puts.len()),
            };
            out.ok += done as u64;
            // What the batch did not write is retried one by one, for a per-key error.
            for (k, v) in &w.puts[done..] {
                if let Some(echoes) = self.echoes {
                    lock(echoes).unregister(id, k, Some(v));
                }
                result(*k, self.one(k, Some(v)), &mut out);
            }
        }
        for k in failed {
            match self.kmap.lookup(k) {
                Ok(v) => apply_to(&mut st.shadow, k, v.as_deref()),
                Err(e) => tracing::warn!(error = %e, "reading back a key after a failed write"),
            }
        }
        out
    }

    /// Writes one key (`None`: delete), registered as an expected echo first when needed.
    fn one(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), HookError> {
        let id = self.kmap.layout().id;
        if let Some(echoes) = self.echoes {
            lock(echoes).register(id, key, value);
        }
        let res = match value {
            Some(v) => self.kmap.update(key, v).map(|()| true),
            None => self.kmap.delete(key),
        };
        // No event follows a failed write, nor a delete of an absent key.
        if let Some(echoes) = self.echoes {
            if !matches!(res, Ok(true)) {
                lock(echoes).unregister(id, key, value);
            }
        }
        res.map(drop)
    }
}
