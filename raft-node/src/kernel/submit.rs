//! Submission: captured changes become client batches for the batcher (group commit), and
//! their outcomes come back to the rules: committed (settle once applied here), refused as a
//! batch (each change again, alone), refused alone (undone), or not committed (the next scan
//! proposes the kernel's value again).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use raftmap_storage::{batch_runs, BatchOutcome, Op, Source, StateView};

use super::scan::RETRY_AFTER;
use super::state::{Captured, Writes};
use super::{KernelSync, Watched};
use crate::error::Result;
use crate::lock::lock;
use crate::propose::{Batcher, Ticket};

/// Most committed entries `make_room` looks at beyond the keys the applier evicted.
const ROOM_LOOKUPS: usize = 8192;

/// Changes queued in one client batch, and the ticket for its outcome.
type Queued = Vec<(Vec<Captured>, Result<Ticket>)>;

impl KernelSync {
    /// Proposes captured changes and settles them once their outcomes are known.
    pub(super) async fn propose(
        &self,
        name: &str,
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) {
        let queued = self.enqueue(name, w, view, batcher, changes).await;
        self.settle_outcomes(name, w, view, queued).await;
    }

    /// Like [`Self::propose`], but returns once the changes are queued (in capture order), and
    /// settles their marks when their outcomes arrive: the capture loop goes on reading events
    /// while earlier changes are on their way through the log, and group commit takes whatever
    /// it read meanwhile into the next entry.
    pub(super) async fn propose_detached(
        self: &Arc<Self>,
        name: &str,
        view: &StateView,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) {
        let Some(w) = self.maps.get(name) else { return };
        let queued = self.enqueue(name, w, view, batcher, changes).await;
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
        w: &Watched,
        view: &StateView,
        batcher: &Batcher,
        changes: Vec<Captured>,
    ) -> Queued {
        if changes.is_empty() {
            return Vec::new();
        }
        let label = self.label(name, &lock(&w.state));
        self.metrics
            .captured
            .get_or_create(&label)
            .inc_by(changes.len() as u64);
        let mut queued = Vec::new();
        for chunk in client_batches(changes) {
            let room = self.make_room(name, w, view, &chunk);
            let ops: Vec<Op> = room
                .into_iter()
                .map(|key| Op::Delete {
                    map: name.to_string(),
                    key,
                })
                .chain(chunk.iter().map(|c| match &c.change.value {
                    Some(v) => Op::Put {
                        map: name.to_string(),
                        key: c.change.key.clone(),
                        value: v.clone(),
                    },
                    None => Op::Delete {
                        map: name.to_string(),
                        key: c.change.key.clone(),
                    },
                }))
                .collect();
            let ticket = batcher.enqueue(ops, Source::Kernel).await;
            queued.push((chunk, ticket));
        }
        queued
    }

    /// Keys to delete with `chunk` so that the cluster's copy of a full LRU map has room for
    /// its new keys. A kernel LRU map takes a new entry when full by evicting its least
    /// recently used one; the cluster must too, or a program's new entries would be refused
    /// and undone whenever the cluster holds more than this node's kernel does (the applier's
    /// evictions stay local). The victims are entries this node's kernel no longer holds: first
    /// those its applier's writes evicted, oldest first (its own LRU's choice), then any other
    /// committed entry missing here. At most one per new key: no cascade.
    fn make_room(
        &self,
        name: &str,
        w: &Watched,
        view: &StateView,
        chunk: &[Captured],
    ) -> Vec<Vec<u8>> {
        let Some(schema) = view.schema(name) else {
            return Vec::new();
        };
        if schema.map_type != raftmap_storage::MapType::LruHash {
            return Vec::new();
        }
        // The cheap bound first: while even every put being a new key fits, no key is looked
        // up (this runs for every batch of captured changes).
        let puts = chunk.iter().filter(|c| c.change.value.is_some()).count() as u64;
        if view.entry_count(name) + puts <= u64::from(schema.max_entries) {
            return Vec::new();
        }
        let committed = |key: &[u8]| view.get(name, key).ok().flatten().is_some();
        let in_chunk: HashSet<&[u8]> = chunk.iter().map(|c| c.change.key.as_slice()).collect();
        let grows: i64 = chunk
            .iter()
            .map(|c| match (&c.change.value, committed(&c.change.key)) {
                (Some(_), false) => 1,
                (None, true) => -1,
                _ => 0,
            })
            .sum();
        let over = view.entry_count(name) as i64 + grows - i64::from(schema.max_entries);
        if over <= 0 {
            // (The cluster refuses a batch that overflows a full hash map: a hash map does not
            // evict.)
            return Vec::new();
        }
        let (kmap, mut remembered) = {
            let mut st = lock(&w.state);
            let Some(kmap) = st.kmap.clone() else {
                return Vec::new();
            };
            (kmap, std::mem::take(&mut st.evicted_here))
        };
        let missing_here = |key: &[u8]| {
            !in_chunk.contains(key) && committed(key) && matches!(kmap.lookup(key), Ok(None))
        };
        let victims = pick_victims(
            over as usize,
            &mut remembered,
            missing_here,
            |after| match view.scan(name, after, 1024) {
                Ok(page) => page.into_iter().map(|(k, _)| k).collect(),
                Err(e) => {
                    tracing::warn!(map = %name, error = %e, "reading the committed map for entries to evict");
                    Vec::new()
                }
            },
        );
        {
            // Evictions noted meanwhile come after the ones left.
            let mut st = lock(&w.state);
            remembered.extend(st.evicted_here.drain(..));
            st.evicted_here = remembered;
        }
        if !victims.is_empty() {
            tracing::debug!(map = %name, keys = victims.len(), "the cluster's copy of the LRU map is full: deleting entries this node's kernel evicted, to make room");
            self.metrics
                .room_deletes
                .get_or_create(&self.label(name, &lock(&w.state)))
                .inc_by(victims.len() as u64);
        }
        victims
    }

    /// Waits for the outcomes of queued changes and settles their marks.
    async fn settle_outcomes(&self, name: &str, w: &Watched, view: &StateView, queued: Queued) {
        let mut retry = false;
        for (chunk, ticket) in queued {
            let res = match ticket {
                Ok(t) => t.wait().await,
                Err(e) => Err(e),
            };
            match res {
                Ok(out) => match out.outcome {
                    BatchOutcome::Applied => {
                        // Committed at `out.index`: each key settles once the applier has
                        // reached that index here (now, if it already has; otherwise the
                        // apply hook does it when it gets there).
                        let mut st = lock(&w.state);
                        st.committed_at(&chunk, out.index);
                        if self.hooked_index.load(Ordering::Acquire) >= out.index {
                            self.settle_committed(&mut st, out.index);
                        }
                    }
                    BatchOutcome::Rejected(e) if chunk.len() > 1 || e.is_size_limit() => {
                        // A batch is refused as a whole: find the changes the cluster refuses
                        // by proposing each alone; none is undone for another's sake, nor for
                        // the size of the batch it happened to be in.
                        tracing::info!(map = %name, keys = chunk.len(), reason = %e, "the cluster refused a batch of captured changes; proposing each of them alone");
                        lock(&w.state).refused_in_batch(&chunk);
                        retry = true;
                    }
                    BatchOutcome::Rejected(e) => {
                        tracing::warn!(map = %name, reason = %e, "the cluster refused a captured change; undoing it here");
                        {
                            let mut st = lock(&w.state);
                            st.refusals += 1;
                            st.last_refusal = Some(e.to_string());
                            self.metrics
                                .refused
                                .get_or_create(&self.label(name, &st))
                                .inc();
                        }
                        self.undo(name, w, view, &chunk).await;
                    }
                    BatchOutcome::CasFailed { .. } => {
                        self.not_committed(name, w, &chunk);
                        retry = true;
                    }
                },
                Err(e) => {
                    tracing::warn!(map = %name, keys = chunk.len(), error = %e, "captured changes not committed; the next scan retries them");
                    self.not_committed(name, w, &chunk);
                    retry = true;
                }
            }
        }
        if retry {
            // Not at once: a leader may be on its way, and a write that failed at once
            // (leader unreachable) would otherwise be retried in a tight loop.
            tokio::time::sleep(RETRY_AFTER).await;
            self.scan_now.notify_one();
        }
    }

    /// Not committed (or not known to be): a scan soon proposes the keys again.
    fn not_committed(&self, name: &str, w: &Watched, chunk: &[Captured]) {
        let mut st = lock(&w.state);
        st.not_committed(chunk);
        self.metrics
            .uncommitted
            .get_or_create(&self.label(name, &st))
            .inc_by(chunk.len() as u64);
    }

    /// Refused: read the committed values once everything the applier has seen is persisted,
    /// then end the marks and undo the changes.
    async fn undo(&self, name: &str, w: &Watched, view: &StateView, chunk: &[Captured]) {
        view.wait_applied(
            self.hooked_index.load(Ordering::Acquire),
            Duration::from_secs(10),
        )
        .await;
        let persisted: Vec<_> = chunk
            .iter()
            .map(|c| view.get(name, &c.change.key))
            .collect();
        let mut st = lock(&w.state);
        let mut undo = Vec::new();
        for (c, persisted) in chunk.iter().zip(persisted) {
            // The applier's record is newer than the persisted state when it exists.
            let committed = match (st.committed_meanwhile(&c.change.key), persisted) {
                (Some(v), _) => v,
                (None, Ok(v)) => v,
                (None, Err(e)) => {
                    tracing::warn!(map = %name, error = %e, "reading a committed value to settle a key; the mark stays");
                    continue;
                }
            };
            undo.extend(st.settle_refused(c, committed));
        }
        if let Some(kmap) = st.kmap.clone() {
            self.writer(kmap.as_ref())
                .write(&mut st, &Writes::of(&undo));
        }
    }
}

/// Chooses `over` entries to delete from the cluster's copy of a full LRU map: first from
/// `remembered` (keys this node's kernel evicted, oldest first; taken from the front, those no
/// longer `missing` here dropped), then from the committed entries in key order (`page(after)`
/// gives the next keys after `after`; at most `ROOM_LOOKUPS` of them are looked at).
fn pick_victims(
    over: usize,
    remembered: &mut std::collections::VecDeque<Vec<u8>>,
    missing: impl Fn(&[u8]) -> bool,
    mut page: impl FnMut(Option<&[u8]>) -> Vec<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let mut victims = Vec::new();
    let mut chosen = HashSet::new();
    while victims.len() < over {
        let Some(key) = remembered.pop_front() else {
            break;
        };
        if missing(&key) && chosen.insert(key.clone()) {
            victims.push(key);
        }
    }
    let mut after: Option<Vec<u8>> = None;
    let mut looked = 0;
    while victims.len() < over && looked < ROOM_LOOKUPS {
        let keys = page(after.as_deref());
        let Some(last) = keys.last() else { break };
        after = Some(last.clone());
        looked += keys.len();
        for k in keys {
            if victims.len() < over && missing(&k) && chosen.insert(k.clone()) {
                victims.push(k);
            }
        }
    }
    victims
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_comes_from_what_the_kernel_evicted_here_first_then_from_other_missing_entries() {
        let key = |i: u8| vec![i];
        // Keys 1..=3 were evicted here (oldest first); 2 has come back since.
        let mut remembered: std::collections::VecDeque<_> = [1, 2, 3].map(key).into();
        let missing = |k: &[u8]| k[0] != 2 && k[0] % 10 != 0;
        let committed: Vec<Vec<u8>> = (1..=40).map(key).collect();
        let page = |after: Option<&[u8]>| -> Vec<Vec<u8>> {
            committed
                .iter()
                .filter(|k| after.is_none_or(|a| k.as_slice() > a))
                .take(4)
                .cloned()
                .collect()
        };
        assert_eq!(
            pick_victims(1, &mut remembered, missing, page),
            vec![key(1)]
        );
        // One remembered key left (3); then the committed ones, skipping what is held here or
        // already chosen.
        let v = pick_victims(4, &mut remembered, missing, page);
        assert_eq!(v, vec![key(3), key(1), key(4), key(5)]);
        assert!(remembered.is_empty());
        // Never more than asked for, and nothing when nothing is missing here.
        assert!(pick_victims(3, &mut remembered, |_| false, page).is_empty());
        assert_eq!(
            pick_victims(0, &mut [key(7)].into(), missing, page),
            Vec::<Vec<u8>>::new()
        );
    }
}
