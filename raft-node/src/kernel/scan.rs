//! The scan: walk the kernel map, subtract the shadow, capture the difference. It always runs,
//! alongside any event backend: it is how BPF programs' writes are captured under the syscall
//! backend, how lost events are repaired, and how each map is found and (re)reconciled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::HashSet;
use raftmap_ebpf_hooks::Backend;
use raftmap_storage::StateView;

use super::spec::error_chain;
use super::{KernelSync, Watched};
use crate::error::Result;
use crate::lock::lock;
use crate::propose::Batcher;

/// Kernel entries compared per hold of a map's lock during a scan.
const SCAN_SLICE: usize = 512;

/// After a scan round that took `t`, the next one starts no sooner than `t` times this: scans
/// of large maps take at most a tenth of the time.
const SCAN_PAUSE_FACTOR: u32 = 9;

/// How soon a map that is not reconciled yet is tried again, and how long after a proposal
/// of captured changes failed to commit a scan proposes them again.
pub(super) const RETRY_AFTER: Duration = Duration::from_millis(200);

impl KernelSync {
    /// The scan loop: reconciles each map, then scans it every `interval` (with `diff` off,
    /// a test-only setting, it still finds and reconciles maps but diffs them only once after
    /// each reconcile: the event backend alone captures changes).
    pub(super) fn start_scans(
        self: &Arc<Self>,
        view: StateView,
        batcher: Batcher,
        interval: Duration,
        diff: bool,
    ) {
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
                let mut walking = Duration::ZERO;
                for (name, w) in &this.maps {
                    match this.step(name, w, &view, &batcher, round, diff).await {
                        Ok(t) => walking += t,
                        Err(e) => tracing::warn!(map = %name, error = %e, "kernel map sync"),
                    }
                }
                all_ready = this.maps.values().all(|w| {
                    let st = lock(&w.state);
                    st.kmap.is_some() || st.refused.is_some()
                });
                round += 1;
                // A scan reads the whole map: on large maps it must not take the node's CPU
                // (at most a tenth of the time, whatever the interval or the loss signals ask).
                // Only the scans count: a reconcile that waited for a leader must not delay
                // the next attempt by nine times its wait.
                tokio::time::sleep(walking * SCAN_PAUSE_FACTOR).await;
            }
        });
    }

    /// One round for one map: (re)open and reconcile it when needed, then scan it. Returns
    /// the time the scan took.
    async fn step(
        self: &Arc<Self>,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
        round: u64,
        diff: bool,
    ) -> Result<Duration> {
        if lock(&w.state).refused.is_some() {
            return Ok(Duration::ZERO);
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
                    if !diff || lock(&w.state).kmap.is_none() {
                        return Ok(Duration::ZERO);
                    }
                    return self.scan(name, w, view, batcher).await;
                }
            };
            let known = lock(&w.state).kmap.as_ref().map(|m| m.layout().id);
            if known != Some(opened.layout().id) {
                self.reconcile(name, w, Arc::new(opened), view, batcher)
                    .await?;
                // Even with `diff` off: changes made between the reconcile's read of the map
                // and the backend watching it arrived as no event.
                return self.scan(name, w, view, batcher).await;
            }
        }
        if !diff {
            return Ok(Duration::ZERO);
        }
        self.scan(name, w, view, batcher).await
    }

    /// One scan: capture what changed in the kernel since the shadow. Returns the time it
    /// took (the proposal it makes is not waited for).
    async fn scan(
        self: &Arc<Self>,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
    ) -> Result<Duration> {
        let started = Instant::now();
        let (kmap, mut retry) = {
            let mut st = lock(&w.state);
            let Some(kmap) = st.kmap.clone().filter(|_| st.refused.is_none()) else {
                return Ok(Duration::ZERO);
            };
            let retry = st.begin_scan();
            (kmap, retry)
        };
        // The walk runs without the lock, on a thread of its own at background priority: a
        // large map takes tens of milliseconds of syscalls (the kernel visits every bucket),
        // which must not delay the node's replication on a busy machine. Keys the applier
        // writes meanwhile are recorded as touched and left out of this diff.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let walker = kmap.clone();
        let walked = match std::thread::Builder::new()
            .name("raftmap-scan".into())
            .spawn(move || {
                if let Err(e) = raftmap_ebpf_hooks::set_thread_background_priority() {
                    tracing::debug!(error = %e, "scan thread keeps its priority");
                }
                let _ = tx.send(walker.walk().map_err(|e| e.to_string()));
            }) {
            Ok(_) => rx
                .await
                .unwrap_or_else(|_| Err("the scan thread ended without an answer".into())),
            Err(e) => Err(format!("cannot start a scan thread: {e}")),
        };
        let kernel = match walked {
            Ok(e) => e,
            Err(e) => {
                lock(&w.state).abort_scan();
                tracing::warn!(map = %name, error = %e, "scan failed");
                return Ok(started.elapsed());
            }
        };
        {
            let mut st = lock(&w.state);
            self.metrics
                .entries
                .get_or_create(&self.label(name, &st))
                .set(kernel.len() as i64);
            st.entries = kernel.len() as u64;
        }
        // Compare in slices, taking the map's lock for one slice at a time: the applier (which
        // needs the lock for every committed entry) waits for a slice, not for the whole map.
        let mut differ = Vec::new();
        let mut found = 0usize;
        let mut items = kernel.iter();
        while items.len() > 0 {
            {
                let st = lock(&w.state);
                found += st.compare(items.by_ref().take(SCAN_SLICE), &mut retry, &mut differ);
            }
            tokio::task::yield_now().await;
        }
        // The kernel's key set is built without the map's lock: the applier waits for no more
        // than the shadow pass.
        let look_for_deletes = lock(&w.state).must_look_for_deletes(found);
        let kernel_keys: Option<HashSet<&[u8]>> =
            look_for_deletes.then(|| kernel.iter().map(|(k, _)| k).collect());
        let captured = {
            let mut st = lock(&w.state);
            let changes = st.end_scan(differ, kernel_keys.as_ref(), retry);
            let captured = st.capture(changes, &self.gen);
            if !captured.is_empty() && self.backend_for(kmap.as_ref()) != Backend::Scan {
                // Found by the scan although events are on: in-place writes, BPF programs'
                // writes the backend cannot see, or lost events.
                self.metrics
                    .scan_repairs
                    .get_or_create(&self.label(name, &st))
                    .inc_by(captured.len() as u64);
            }
            captured
        };
        let took = started.elapsed();
        // Not waiting for the outcomes: a scan's pause is a share of its own time, not of
        // the time a proposal may wait for a leader.
        self.propose_detached(name, view, batcher, captured).await;
        Ok(took)
    }
}
