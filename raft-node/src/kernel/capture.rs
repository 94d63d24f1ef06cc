//! Capture events to captured changes: the event loop reads the fexit or syscall backend's
//! ring buffer, drops the applier's own writes (echoes), attributes LRU evictions, and hands
//! the real changes to the rules and then to submission.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use raftmap_ebpf_hooks::{Backend, Capture, CaptureEvent, EchoFilter, KernelChange};
use raftmap_storage::StateView;
use tokio::sync::{mpsc, oneshot};

use super::metrics::{backend_label, eviction_label};
use super::state::{MapState, Writes};
use super::{CaptureBackend, CaptureSettings, KernelSync};
use crate::error::{NodeError, Result};
use crate::lock::lock;
use crate::propose::Batcher;

#[derive(Debug)]
pub(super) enum CaptureCmd {
    /// Start capturing a map id's changes; the sender hears back once the backend does.
    Watch(u32, oneshot::Sender<()>),
    Unwatch(u32),
}

/// How long [`KernelSync::track`] waits for the event loop to watch a map before going on
/// (the scan after a reconcile repairs what the backend missed meanwhile).
const WATCH_ACK: Duration = Duration::from_secs(5);

impl KernelSync {
    /// Starts the event-driven backend `settings` ask for: the best one that loads, by
    /// default (the scan captures alone when none does). One asked for by name must load.
    pub(super) fn start_capture(
        self: &Arc<Self>,
        view: &StateView,
        batcher: &Batcher,
        settings: &CaptureSettings,
    ) -> Result<()> {
        let interval = settings.interval;
        let loaded = match settings.backend {
            CaptureBackend::Auto => Capture::best(),
            CaptureBackend::Fexit => Ok(Capture::fexit().map_err(|e| required("fexit", &e))?),
            CaptureBackend::Syscall => Ok(Capture::syscall().map_err(|e| required("syscall", &e))?),
            CaptureBackend::Scan => {
                tracing::info!(
                    backend = "scan",
                    "capturing by scanning every {interval:?} (--capture-backend scan)"
                );
                self.set_backend(Backend::Scan);
                return Ok(());
            }
        };
        match loaded {
            Ok(capture) => {
                match capture.backend() {
                    Backend::Fexit => tracing::info!(
                        backend = "fexit",
                        "capturing every change to watched maps as it happens (fexit on the kernel's hash map operations)"
                    ),
                    b => tracing::info!(
                        backend = %b,
                        "capturing bpf(2) syscalls as they happen, and BPF programs' own writes by scanning every {interval:?}"
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
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no event-driven capture backend loads here; capturing by scanning every {interval:?}"
                );
                self.set_backend(Backend::Scan);
            }
        }
        Ok(())
    }

    /// Routes a (re)opened map's events to it, and returns once the backend captures them:
    /// a change made after this returns arrives as an event.
    pub(super) async fn track(&self, name: &str, old: Option<u32>, new: u32) {
        let acked = {
            let mut ids = lock(&self.ids);
            if let Some(o) = old {
                ids.remove(&o);
            }
            ids.insert(new, name.to_string());
            let Some(tx) = self.capture_cmds.get() else {
                return;
            };
            if let Some(o) = old {
                let _ = tx.send(CaptureCmd::Unwatch(o));
            }
            let (ack, acked) = oneshot::channel();
            if tx.send(CaptureCmd::Watch(new, ack)).is_err() {
                return;
            }
            acked
        };
        match tokio::time::timeout(WATCH_ACK, acked).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                tracing::debug!(map = %name, "the capture stopped before watching the map")
            }
            Err(_) => {
                tracing::warn!(map = %name, "the capture did not watch the map within {WATCH_ACK:?}; the scan covers it")
            }
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
                        Some(CaptureCmd::Watch(id, ack)) => {
                            let res = capture.watch(id);
                            let _ = ack.send(());
                            res
                        }
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
                            self.metrics.ring_drops.get_or_create(&backend_label(capture.backend())).inc_by((d.0 - drops.0) + (d.1 - drops.1));
                            drops = d;
                            // Echoes whose events were lost would otherwise wait forever (and
                            // could swallow a real write); the scan repairs whatever follows.
                            lock(&self.echoes).clear();
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
        let mut by_map: BTreeMap<String, Vec<KernelChange>> = BTreeMap::new();
        let applier_evicted: Vec<(String, Vec<u8>)> = {
            let ids = lock(&self.ids);
            let mut echoes = lock(&self.echoes);
            let sorted = attribute_evictions(events, held, &mut echoes);
            if sorted.echoes > 0 {
                self.metrics
                    .echoes
                    .get_or_create(&backend_label(Backend::Fexit))
                    .inc_by(sorted.echoes);
            }
            for ev in sorted.accepted {
                if let Some(name) = ids.get(&ev.map_id) {
                    if ev.evicted {
                        self.metrics
                            .evictions
                            .get_or_create(&eviction_label(name, false))
                            .inc();
                    }
                    by_map.entry(name.clone()).or_default().push(KernelChange {
                        key: ev.key,
                        value: ev.value,
                    });
                }
            }
            sorted
                .applier_evicted
                .into_iter()
                .filter_map(|h| Some((ids.get(&h.map_id)?.clone(), h.key)))
                .collect()
        };
        // The keys evictions caused by the applier removed left this node's map only: they
        // leave the shadow without being proposed, so the scan does not propose them either.
        // (Taken after releasing the id and echo locks: the apply path takes a map's state
        // lock before the echo lock.)
        for (name, key) in applier_evicted {
            self.metrics
                .evictions
                .get_or_create(&eviction_label(&name, true))
                .inc();
            if let Some(w) = self.maps.get(&name) {
                lock(&w.state).evicted_by_applier(key);
            }
        }
        for (name, changes) in by_map {
            let Some(w) = self.maps.get(&name) else {
                continue;
            };
            let captured = {
                let mut st = lock(&w.state);
                if st.kmap.is_none() || st.refused.is_some() {
                    continue;
                }
                let fresh = st.new_captures(changes);
                let overwritten = overwritten_captures(&st, &fresh);
                let captured = st.capture(fresh, &self.gen);
                self.restore(&mut st, &name, overwritten);
                captured
            };
            self.propose_detached(&name, view, batcher, captured).await;
        }
    }

    /// Writes captured values back over the applier's stale ones (see
    /// [`overwritten_captures`]).
    fn restore(&self, st: &mut MapState, name: &str, changes: Vec<KernelChange>) {
        if changes.is_empty() {
            return;
        }
        let Some(kmap) = st.kmap.clone() else { return };
        tracing::debug!(map = %name, keys = changes.len(), "the applier overwrote local writes before they were captured; writing them back");
        self.metrics
            .restored
            .get_or_create(&self.label(name, st))
            .inc_by(changes.len() as u64);
        self.writer(kmap.as_ref()).write(st, &Writes::of(&changes));
    }
}

/// The error of a capture backend asked for by name that does not load.
fn required(backend: &str, e: &raftmap_ebpf_hooks::HookError) -> NodeError {
    NodeError::FailedPrecondition(format!(
        "--capture-backend {backend}: the kernel refused it ({}); use --capture-backend auto to fall back",
        super::spec::error_chain(e)
    ))
}

/// Captured local writes that the applier overwrote before their events arrived: the applier
/// wrote the key a moment ago, and the kernel now holds what the applier wrote (the shadow's
/// value) rather than the captured one. The local write is newer in the log's terms (it commits
/// after the value the applier wrote), so the kernel must get it back; left alone, the next
/// scan would take the applier's stale value for a new local change and the local write would
/// be lost. (Costs a lookup, only for keys both written here and applied from the log within
/// milliseconds.)
fn overwritten_captures(st: &MapState, fresh: &[KernelChange]) -> Vec<KernelChange> {
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
        .cloned()
        .collect()
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
