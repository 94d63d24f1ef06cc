//! What a capture, a commit, an apply, a settle, a refusal and a snapshot do to a map's
//! shadow and marks.

use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::{HashMap, HashMapExt};
use raftmap_ebpf_hooks::KernelChange;

use super::{apply_to, Captured, KeyChange, MapState, Mark, Writes};

impl MapState {
    // ---- capture ----

    /// Of captured events (in order), the changes to propose: a key's last change, unless the
    /// shadow already has it.
    pub(in crate::kernel) fn new_captures(&self, changes: Vec<KernelChange>) -> Vec<KernelChange> {
        let mut last: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::with_capacity(changes.len());
        let mut order = Vec::with_capacity(changes.len());
        for c in changes {
            if last.insert(c.key.clone(), c.value).is_none() {
                order.push(c.key);
            }
        }
        order
            .into_iter()
            .filter_map(|key| {
                let value = last.remove(&key)?;
                Some(KernelChange { key, value })
            })
            .filter(|c| self.shadow.get(c.key.as_slice()).map(Vec::as_slice) != c.value.as_deref())
            .collect()
    }

    /// Records captured changes in the shadow and marks them pending; returns them with their
    /// capture generation (from `gens`), ready to propose.
    pub(in crate::kernel) fn capture(
        &mut self,
        changes: Vec<KernelChange>,
        gens: &AtomicU64,
    ) -> Vec<Captured> {
        changes
            .into_iter()
            .map(|c| {
                self.record(&c.key, c.value.as_deref());
                // A new capture supersedes a proposal waiting to be tried again; one that was in
                // a refused batch goes alone.
                if !self.retry.is_empty() {
                    self.retry.remove(&c.key);
                }
                let alone = !self.alone.is_empty() && self.alone.remove(&c.key);
                let gen = gens.fetch_add(1, Ordering::Relaxed);
                self.pending.insert(
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

    // ---- outcomes of proposals ----

    /// `chunk` committed at `index`: each key settles once the applier has reached it.
    pub(in crate::kernel) fn committed_at(&mut self, chunk: &[Captured], index: u64) {
        let settle: Vec<_> = chunk
            .iter()
            .filter(|c| self.is_latest(c))
            .map(|c| (c.change.key.clone(), c.gen))
            .collect();
        self.commits.entry(index).or_default().extend(settle);
    }

    /// `chunk` went in a batch the cluster refused as a whole: each change is proposed again,
    /// alone, to find the ones the cluster refuses.
    pub(in crate::kernel) fn refused_in_batch(&mut self, chunk: &[Captured]) {
        for c in chunk {
            if self.is_latest(c) {
                self.retry.insert(c.change.key.clone());
                self.alone.insert(c.change.key.clone());
            }
        }
    }

    /// `chunk` did not commit (or is not known to have): the next scan proposes it again.
    pub(in crate::kernel) fn not_committed(&mut self, chunk: &[Captured]) {
        for c in chunk {
            if self.is_latest(c) {
                self.retry.insert(c.change.key.clone());
            }
        }
    }

    /// Settles every key whose capture committed at or before `index`: the mark ends, and the
    /// kernel takes the log's last value for the key (which the applier recorded while the key
    /// was pending) if that differs from what the kernel holds. Returns the writes.
    pub(in crate::kernel) fn settle_committed(&mut self, index: u64) -> Vec<KernelChange> {
        let later = self.commits.split_off(&(index + 1));
        let due = std::mem::replace(&mut self.commits, later);
        let mut writes = Vec::new();
        for (key, gen) in due.into_values().flatten() {
            // Only the capture that committed settles its key; a newer one keeps the mark.
            if self.pending.get(&key).map(|m| m.gen) != Some(gen) {
                continue;
            }
            self.pending.remove(&key);
            let Some(last) = self.committed_while_pending.remove(&key) else {
                continue;
            };
            if self.shadow.get(key.as_slice()) != last.as_ref() {
                self.record(&key, last.as_deref());
                writes.push(KernelChange { key, value: last });
            }
        }
        writes
    }

    /// The committed value of `key` if the applier saw one while the key was pending (newer
    /// than the persisted state).
    pub(in crate::kernel) fn committed_meanwhile(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.committed_while_pending.get(key).cloned()
    }

    /// Ends the mark of a change the cluster refused, if it is still the key's latest capture:
    /// the key goes back to `committed`. Returns the write that undoes the change.
    pub(in crate::kernel) fn settle_refused(
        &mut self,
        c: &Captured,
        committed: Option<Vec<u8>>,
    ) -> Option<KernelChange> {
        if !self.is_latest(c) {
            return None; // a newer capture of the key settles it
        }
        let key = &c.change.key;
        self.pending.remove(key);
        self.committed_while_pending.remove(key);
        self.retry.remove(key);
        self.record(key, committed.as_deref());
        Some(KernelChange {
            key: key.clone(),
            value: committed,
        })
    }

    // ---- apply ----

    /// Committed changes in log order: what to write to the kernel (repeated changes to a key
    /// collapse into the last one), and how many were deferred behind a local change.
    pub(in crate::kernel) fn apply_committed<'a>(
        &mut self,
        captured_here: bool,
        changes: Vec<KeyChange<'a>>,
    ) -> (Writes<'a>, u64) {
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
        let mut writes = Writes::default();
        let mut deferred = 0;
        for (i, (key, value)) in changes.into_iter().enumerate() {
            if superseded[i] {
                continue;
            }
            if let Some(mark) = self.pending.get(key) {
                if captured_here && mark.value.as_deref() == value {
                    // This node's latest capture of the key committed: settling leaves the
                    // kernel as it is, and any older committed value noted is superseded.
                    self.committed_while_pending.remove(key);
                    continue;
                }
                // A local change to the key is on its way through the log: it is newer than
                // this one (or is this one). Remember where the log is; settling the key ends
                // there.
                if !captured_here {
                    deferred += 1;
                }
                self.committed_while_pending
                    .insert(key.to_vec(), value.map(<[u8]>::to_vec));
                continue;
            }
            if captured_here && self.shadow.get(key).map(Vec::as_slice) == value {
                continue; // our own capture: the kernel has it
            }
            self.record(key, value);
            match value {
                Some(v) => writes.puts.push((key, v)),
                None => writes.deletes.push(key),
            }
        }
        (writes, deferred)
    }

    /// A snapshot's contents replace the committed state: the writes that turn `kernel` into
    /// them, by diff (nothing is cleared first). Keys with a local change on its way keep it.
    pub(in crate::kernel) fn install(
        &mut self,
        kernel: &HashMap<Vec<u8>, Vec<u8>>,
        contents: HashMap<Vec<u8>, Vec<u8>>,
    ) -> Vec<KernelChange> {
        let pending: Vec<(Vec<u8>, Mark)> = self
            .pending
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for (k, _) in &pending {
            self.committed_while_pending
                .insert(k.clone(), contents.get(k).cloned());
        }
        let fixes: Vec<_> = raftmap_ebpf_hooks::diff(kernel, &contents)
            .into_iter()
            .filter(|c| !self.pending.contains_key(&c.key))
            .collect();
        self.shadow = raftmap_ebpf_hooks::shadow_from(contents);
        for (k, m) in pending {
            apply_to(&mut self.shadow, &k, m.value.as_deref());
        }
        for c in &fixes {
            self.touch(&c.key);
        }
        fixes
    }
}
