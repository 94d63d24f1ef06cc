//! Reconcile: the first sight of a kernel map (at start, or recreated under the same pin or
//! name). The schema is checked (declared from the map's layout when the cluster has none),
//! then the map is adopted, refilled, or merged with what changed while the daemon was down
//! (`MapState::merge`), and the committed changes that arrived meanwhile are applied in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use raftmap_ebpf_hooks::{Backend, MAX_EVENT_KEY, MAX_EVENT_VALUE};
use raftmap_storage::{Op, Source, StateView};

use super::map_ops::MapOps;
use super::spec::schema_of;
use super::state::{Missed, Sighting, Writes};
use super::{KernelSync, Watched};
use crate::error::{NodeError, Result};
use crate::lock::lock;
use crate::propose::Batcher;

impl KernelSync {
    /// Checks the schema of a kernel map seen for the first time, then merges it.
    pub(super) async fn reconcile(
        &self,
        name: &str,
        w: &Watched,
        kmap: Arc<dyn MapOps>,
        view: &StateView,
        batcher: &Batcher,
    ) -> Result<()> {
        let wanted = schema_of(name, kmap.layout());
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
                lock(&w.state).stop_syncing(reason);
                return Ok(());
            }
            Some(_) => {}
        }
        let l = kmap.layout();
        if self.backend() != Backend::Scan && self.backend_for(kmap.as_ref()) == Backend::Scan {
            tracing::warn!(
                map = %name,
                key_size = l.key_size,
                value_size = l.value_size,
                "keys over {MAX_EVENT_KEY} B or values over {MAX_EVENT_VALUE} B do not fit capture events; this map's changes are captured by the scan only"
            );
        }
        self.merge(name, w, kmap, view, batcher).await
    }

    /// Reads the committed contents and the kernel's, merges them, and proposes what changed
    /// locally.
    async fn merge(
        &self,
        name: &str,
        w: &Watched,
        kmap: Arc<dyn MapOps>,
        view: &StateView,
        batcher: &Batcher,
    ) -> Result<()> {
        let id = kmap.layout().id;
        let recorded = self.ids_book.load().get(name).copied();
        let old_id = lock(&w.state).kmap.as_ref().map(|m| m.layout().id);
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
                st.forget_held();
            }
            (was, overflowed)
        };
        let fail = |e: NodeError| {
            let mut st = lock(&w.state);
            st.reconciling = was_reconciling;
            if !was_reconciling {
                st.forget_held();
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
            let kernel: HashMap<Vec<u8>, Vec<u8>> =
                kmap.walk().map_err(NodeError::from)?.into_map();
            Ok((committed, kernel))
        };
        let (committed, kernel) = read().map_err(fail)?;
        // Events of the new map flow before anything is written to it, so that the applier's
        // writes below meet their echoes. (Changes made between the read above and this are
        // in neither: the scan that follows every reconcile finds them.)
        self.track(name, old_id, id).await;
        let proposals = {
            let mut st = lock(&w.state);
            if st.missed_overflow {
                // Changes after the read were dropped: try again (the map will be refilled).
                drop(st);
                return Err(fail(NodeError::Unavailable(format!(
                    "too many changes arrived while reconciling map {name}; retrying"
                ))));
            }
            st.reset(committed);
            let base = st.base.take();
            let overflow = overflowed || std::mem::take(&mut st.missed_overflow);
            let missed = std::mem::take(&mut st.missed);
            let logged = std::mem::take(&mut st.logged);
            st.forget_held();
            let sighting = match recorded {
                Some(r) if r == id && !overflow => Sighting::Outlived,
                Some(_) => Sighting::Recreated,
                None => Sighting::New,
            };
            let merge = st.merge(sighting, base.as_ref(), &kernel, &logged);
            let done = self
                .writer(kmap.as_ref())
                .write(&mut st, &Writes::of(&merge.write));
            let (written, errors) = (merge.write.len(), done.failed);
            match sighting {
                Sighting::Outlived => {
                    tracing::info!(map = %name, id, local_changes = merge.propose.len(), written, errors, "kernel map outlived the daemon; proposing changes made while it was down")
                }
                Sighting::Recreated => {
                    self.metrics
                        .scan_repairs
                        .get_or_create(&super::metrics::label(
                            name,
                            self.backend_for(kmap.as_ref()),
                        ))
                        .inc_by(written as u64);
                    tracing::info!(map = %name, id, written, errors, "kernel map was recreated; filled it from the committed state");
                }
                Sighting::New => {
                    tracing::info!(map = %name, id, proposed = merge.propose.len(), written, errors, "adopted kernel map")
                }
            }
            let proposals = st.capture(merge.propose, &self.gen);
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
        self.ids_book.save(name, id);
        self.propose(name, w, view, batcher, proposals).await;
        Ok(())
    }
}
